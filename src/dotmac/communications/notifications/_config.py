"""Build providers and the store from ``CommunicationsConfig().notifications``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dotmac.communications._clock import Clock
from dotmac.communications.errors import ConfigurationError

from ._store import NotificationStore
from ._store_memory import MemoryStore
from .channels.base import Provider

if TYPE_CHECKING:
    from dotmac.communications.config import NotificationsSettings

__all__ = ["providers_from_settings", "store_from_settings"]


def store_from_settings(settings: NotificationsSettings, clock: Clock) -> NotificationStore:
    """``MemoryStore``, or ``RedisStore`` when ``backend`` is ``redis``."""
    if settings.backend == "redis":
        if not settings.redis_url:
            raise ConfigurationError(
                "notifications.backend is 'redis' but notifications.redis_url is not set "
                "(DOTMAC_NOTIFICATIONS__REDIS_URL or DOTMAC_REDIS_URL)"
            )
        from ._store_redis import RedisStore  # noqa: PLC0415 -- only with Redis

        return RedisStore(url=settings.redis_url)
    return MemoryStore(clock=clock)


def providers_from_settings(settings: NotificationsSettings) -> list[Provider]:
    """Every provider whose settings are complete, in failover order per channel."""
    providers: list[Provider] = [_email(settings)]
    sms = settings.sms
    if sms.provider == "twilio":
        from .channels.sms import TwilioProvider  # noqa: PLC0415

        assert sms.twilio.account_sid  # noqa: S101 -- validated by SmsSettings
        assert sms.twilio.auth_token  # noqa: S101
        providers.append(
            TwilioProvider(
                account_sid=sms.twilio.account_sid,
                auth_token=sms.twilio.auth_token.get_secret_value(),
                from_number=sms.from_number,
                messaging_service_sid=sms.twilio.messaging_service_sid,
                base_url=sms.twilio.base_url,
            )
        )
    elif sms.provider == "http":
        from .channels.sms import HttpSmsProvider  # noqa: PLC0415

        assert sms.http.url  # noqa: S101 -- validated by SmsSettings
        auth = None
        if sms.http.auth_header and sms.http.auth_value:
            auth = (sms.http.auth_header, sms.http.auth_value.get_secret_value())
        providers.append(
            HttpSmsProvider(
                url=sms.http.url,
                method=sms.http.method,
                body_template=sms.http.body_template,
                from_number=sms.from_number,
                auth_header=auth,
                message_id_field=sms.http.message_id_field,
            )
        )
    push = settings.push
    if push.fcm.service_account_file is not None:
        from .channels.push import FCMProvider  # noqa: PLC0415

        providers.append(
            FCMProvider(
                project_id=push.fcm.project_id,
                service_account=push.fcm.service_account_file,
                base_url=push.fcm.base_url,
            )
        )
    if push.webpush.vapid_private_key is not None and push.webpush.vapid_subject:
        from .channels.push import WebPushProvider  # noqa: PLC0415

        providers.append(
            WebPushProvider(
                vapid_private_key=push.webpush.vapid_private_key.get_secret_value(),
                vapid_subject=push.webpush.vapid_subject,
                ttl=push.webpush.ttl,
                allow_private_targets=settings.webhook.allow_private_targets,
            )
        )
    from .channels.webhook import WebhookProvider  # noqa: PLC0415

    hook = settings.webhook
    providers.append(
        WebhookProvider(
            secret=hook.secret.get_secret_value() if hook.secret else None,
            timeout=hook.timeout,
            allow_private_targets=hook.allow_private_targets,
            max_connections=hook.max_connections,
        )
    )
    providers.extend(_chat(settings))
    return providers


def _email(settings: NotificationsSettings) -> Provider:
    from .channels.email import DkimSigner, SMTPProvider  # noqa: PLC0415

    email = settings.email
    dkim = None
    if email.dkim_selector and email.dkim_domain and email.dkim_key_file:
        try:
            key = email.dkim_key_file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"notifications.email.dkim_key_file: cannot read {email.dkim_key_file}: {exc}"
            ) from exc
        dkim = DkimSigner(
            selector=email.dkim_selector, domain=email.dkim_domain, private_key_pem=key
        )
    return SMTPProvider(
        host=email.host,
        port=email.port,
        username=email.username,
        password=email.password.get_secret_value() if email.password else None,
        use_tls=email.use_tls,
        start_tls=email.start_tls,
        from_address=email.from_address,
        timeout=email.timeout,
        pool_size=email.pool_size,
        dkim=dkim,
    )


def _chat(settings: NotificationsSettings) -> list[Provider]:
    from .channels.chat import DiscordProvider, SlackProvider, TeamsProvider  # noqa: PLC0415

    chat = settings.chat
    allow = settings.webhook.allow_private_targets
    out: list[Provider] = []
    for url, cls in (
        (chat.slack_webhook_url, SlackProvider),
        (chat.discord_webhook_url, DiscordProvider),
        (chat.teams_webhook_url, TeamsProvider),
    ):
        if url is not None:
            out.append(cls(webhook_url=url.get_secret_value(), allow_private_targets=allow))
    return out
