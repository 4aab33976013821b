"""Channel providers: email, SMS, push, webhook, chat and in-app."""
