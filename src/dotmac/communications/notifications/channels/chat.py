"""Chat providers: Slack, Discord and Microsoft Teams incoming webhooks.

The recipient is the incoming-webhook URL itself, or the literal ``"default"`` (or the provider's
name: ``"slack"``, ``"discord"``, ``"teams"``) for the provider's configured ``webhook_url``.
In a service with several chat providers, each recipient goes to ONE provider — the first that
:meth:`~ChatWebhookProvider.handles` it: by name, or by the URL's host (``hooks.slack.com``,
``discord.com``, ``*.webhook.office.com`` / ``*.logic.azure.com``); a URL on another host goes to
the first chat provider. Chat providers are never failed over to each other (a Discord URL must
not receive a Slack payload). Each provider turns ``subject`` and ``text`` into its vendor's
documented payload; keys of ``message.data`` are merged into the top level of that payload and
win, so a caller can send its own Slack ``blocks``, Discord ``embeds``/``username`` or Teams
``attachments``. Over-long text is cut to the vendor's limit and ends with ``…``:

- **Slack** (``{"text", "blocks"}``): header block 150 characters, section text 3,000,
  fallback ``text`` 40,000. Slack answers ``200 ok``; its errors are 4xx text
  (``invalid_payload``, ``no_service``...) and are permanent, 429 and 5xx are transient.
- **Discord** (``{"content"}`` or ``{"embeds"}``): ``content`` 2,000 characters; with a subject,
  one embed (title 256, description 4,096). Posted with ``?wait=true`` so the answer carries the
  message id. Mentions in the text do not ping anyone (``allowed_mentions`` is empty) unless
  ``data`` says otherwise.
- **Teams** (Workflows webhook, an Adaptive Card 1.4): title 1,000 characters, text 20,000 UTF-8
  bytes, keeping the request under Teams' 28 KB message limit.

Targets on private addresses are refused unless ``allow_private_targets``, as for webhooks.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
import orjson

from dotmac.communications.errors import (
    ConfigurationError,
    InvalidRecipientError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications._models import OutboundMessage, SendReceipt
from dotmac.communications.notifications.channels._targets import (
    GuardedHttp,
    check_literal,
    user_agent,
)
from dotmac.communications.notifications.channels.base import Provider

__all__ = ["ChatWebhookProvider", "DiscordProvider", "SlackProvider", "TeamsProvider"]

DEFAULT_RECIPIENT = "default"
_SETTING = "notifications.webhook.allow_private_targets"  # chat shares the webhook switch
_ELLIPSIS = "…"


def _cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, ending with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS


def _cut_bytes(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes, ending with an ellipsis when cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    room = limit - len(_ELLIPSIS.encode())
    return encoded[:room].decode(errors="ignore") + _ELLIPSIS  # never splits a character


_SLACK_HOSTS = ("hooks.slack.com",)
_DISCORD_HOSTS = ("discord.com", "discordapp.com", ".discord.com", ".discordapp.com")
_TEAMS_HOSTS = (".webhook.office.com", ".logic.azure.com", ".api.powerplatform.com")
_VENDOR_HOSTS = _SLACK_HOSTS + _DISCORD_HOSTS + _TEAMS_HOSTS


def _on(host: str, patterns: tuple[str, ...]) -> bool:
    return any(host == p or (p.startswith(".") and host.endswith(p)) for p in patterns)


class ChatWebhookProvider(Provider):
    """Base of the incoming-webhook chat providers: target resolution, guard, POST, errors.

    Args:
        webhook_url: Target used for the recipient ``"default"``.
        timeout: Total deadline of one send, seconds.
        allow_private_targets: Allow loopback/private/link-local targets.
        max_connections: Concurrent requests per target host.
        client: A ready httpx client (not closed by :meth:`aclose`).
        name: Provider name.

    Raises:
        ConfigurationError: ``webhook_url`` is malformed or a refused address, a timeout <= 0.
    """

    channel: ClassVar[str] = "chat"
    failover = False
    vendor: ClassVar[str]
    hosts: ClassVar[tuple[str, ...]] = ()
    """Host names (or ``.suffix`` endings) of the vendor's webhook URLs."""
    params: ClassVar[Mapping[str, str] | None] = None

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        timeout: float = 10.0,
        allow_private_targets: bool = False,
        max_connections: int = 10,
        client: httpx.AsyncClient | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or self.vendor
        self.allow_private_targets = allow_private_targets
        if webhook_url is not None:
            try:
                check_literal(webhook_url, allow_private=allow_private_targets, setting=_SETTING)
            except InvalidRecipientError as exc:
                raise ConfigurationError(f"{self.name}: webhook_url: {exc}") from None
        self.webhook_url = webhook_url
        self._http = GuardedHttp(
            self.name,
            timeout=timeout,
            max_connections=max_connections,
            allow_private_targets=allow_private_targets,
            setting=_SETTING,
            client=client,
        )

    def handles(self, recipient: str) -> bool:
        """Whether ``recipient`` is for this provider.

        True for ``"default"``, this provider's name or vendor, a URL on this vendor's hosts, and
        a URL on no known vendor's host (the service then picks the first chat provider).
        """
        if recipient in (DEFAULT_RECIPIENT, self.name, self.vendor):
            return True
        if not recipient.lower().startswith(("http://", "https://")):
            return False  # not a webhook URL (an apprise URL, another provider's name)
        try:
            host = (httpx.URL(recipient).host or "").lower()
        except httpx.InvalidURL:
            return True  # let validate() name the problem
        return _on(host, self.hosts) or not _on(host, _VENDOR_HOSTS)

    def validate(self, recipient: str) -> str:
        """Accept a webhook URL, or ``"default"`` when ``webhook_url`` is configured.

        Raises:
            InvalidRecipientError: Neither, or a refused address.
        """
        if recipient in (DEFAULT_RECIPIENT, self.name, self.vendor):
            if self.webhook_url is None:
                raise InvalidRecipientError(
                    f"{self.name}: recipient 'default' needs a configured webhook_url"
                )
            return recipient
        try:
            check_literal(recipient, allow_private=self.allow_private_targets, setting=_SETTING)
        except InvalidRecipientError as exc:
            raise InvalidRecipientError(
                f"{self.name}: recipient must be a webhook URL or 'default': {exc}"
            ) from None
        return recipient

    def target(self, recipient: str) -> str:
        """The webhook URL a (valid) recipient stands for.

        Raises:
            InvalidRecipientError: See :meth:`validate`.
        """
        recipient = self.validate(recipient)
        if recipient in (DEFAULT_RECIPIENT, self.name, self.vendor) and self.webhook_url:
            return self.webhook_url
        return recipient

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON object posted for ``message`` (vendor payload, then ``data`` merged in).

        Raises:
            PermanentDeliveryError: Nothing to show (no subject, text or ``data``).
        """
        if message.subject is None and message.text is None and not message.data:
            raise PermanentDeliveryError(
                f"{self.name}: a chat message needs a subject or text (html is not rendered)"
            )
        payload = self._payload(message.subject, message.text)
        payload.update(message.data or {})
        return payload

    @abc.abstractmethod
    def _payload(self, subject: str | None, text: str | None) -> dict[str, Any]:
        """The vendor payload for a subject and text (at least one is set, or data is)."""

    def _receipt(self, response: httpx.Response) -> SendReceipt:
        return SendReceipt(detail=f"HTTP {response.status_code}")

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Post the message to the recipient's webhook.

        Raises:
            InvalidRecipientError: Bad or refused target (nothing is sent).
            OperationTimeoutError: No answer within ``timeout`` (transient).
            DeliveryError: Network error, 408/425/429 or 5xx (transient).
            PermanentDeliveryError: A redirect or another 4xx, or nothing to show.
        """
        url = self.target(message.recipient)
        try:
            body = orjson.dumps(self.build_payload(message))
        except orjson.JSONEncodeError as exc:
            raise PermanentDeliveryError(
                f"{self.name}: notification data is not JSON-serialisable: {exc}"
            ) from exc
        headers = {"Content-Type": "application/json", "User-Agent": user_agent()}
        response = await self._http.post(url, content=body, headers=headers, params=self.params)
        return self._receipt(response)

    async def aclose(self) -> None:
        """Close the pooled connections (an injected client is left open)."""
        await self._http.aclose()


class SlackProvider(ChatWebhookProvider):
    """Slack incoming webhooks: a header block for the subject, a mrkdwn section for the text.

    The text is sent as Slack mrkdwn, unescaped (so links like ``<https://x|label>`` work);
    escape ``&``, ``<`` and ``>`` in untrusted text. ``data={"blocks": [...]}`` replaces the
    blocks. Limits: header 150 characters, section 3,000, fallback text 40,000.
    """

    vendor: ClassVar[str] = "slack"
    hosts: ClassVar[tuple[str, ...]] = _SLACK_HOSTS

    def _payload(self, subject: str | None, text: str | None) -> dict[str, Any]:
        blocks: list[dict[str, Any]] = []
        if subject:
            blocks.append(
                {
                    "type": "header",
                    "text": {"type": "plain_text", "text": _cut(subject, 150), "emoji": True},
                }
            )
        if text:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(text, 3000)}})
        payload: dict[str, Any] = {"blocks": blocks}
        fallback = "\n".join(part for part in (subject, text) if part)
        if fallback:
            payload["text"] = _cut(fallback, 40_000)  # shown in notifications and old clients
        return payload

    def _receipt(self, response: httpx.Response) -> SendReceipt:
        # Workflow-style Slack hooks answer 200 with {"ok": false, "error": ...} on failure.
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                answer = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                answer = None
            if isinstance(answer, dict) and answer.get("ok") is False:
                raise PermanentDeliveryError(
                    f"{self.name}: Slack refused the message: {answer.get('error', 'unknown')}"
                )
        return super()._receipt(response)


class DiscordProvider(ChatWebhookProvider):
    """Discord webhooks: ``content`` for text alone; with a subject, one titled embed.

    Posted with ``?wait=true``, so the receipt carries the Discord message id. Mentions never
    ping (``allowed_mentions: {"parse": []}``) unless ``data`` sets ``allowed_mentions``.
    Limits: content 2,000 characters, embed title 256, embed description 4,096.
    """

    vendor: ClassVar[str] = "discord"
    hosts: ClassVar[tuple[str, ...]] = _DISCORD_HOSTS
    params: ClassVar[Mapping[str, str] | None] = {"wait": "true"}

    def _payload(self, subject: str | None, text: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"allowed_mentions": {"parse": []}}
        if subject:
            embed = {"title": _cut(subject, 256)}
            if text:
                embed["description"] = _cut(text, 4096)
            payload["embeds"] = [embed]
        elif text:
            payload["content"] = _cut(text, 2000)
        return payload

    def _receipt(self, response: httpx.Response) -> SendReceipt:
        try:
            answer = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            answer = None
        message_id = answer.get("id") if isinstance(answer, dict) else None
        return SendReceipt(
            provider_message_id=str(message_id) if message_id is not None else None,
            detail=f"HTTP {response.status_code}",
        )


class TeamsProvider(ChatWebhookProvider):
    """Microsoft Teams Workflows webhooks: an Adaptive Card (1.4) with a title and the text.

    The text is a wrapped TextBlock (Adaptive Card markdown subset). ``data={"attachments":
    [...]}`` sends your own card. Limits: title 1,000 characters, text 20,000 UTF-8 bytes.
    """

    vendor: ClassVar[str] = "teams"
    hosts: ClassVar[tuple[str, ...]] = _TEAMS_HOSTS

    def _payload(self, subject: str | None, text: str | None) -> dict[str, Any]:
        body: list[dict[str, Any]] = []
        if subject:
            body.append(
                {
                    "type": "TextBlock",
                    "text": _cut(subject, 1000),
                    "weight": "Bolder",
                    "size": "Medium",
                    "wrap": True,
                }
            )
        if text:
            body.append({"type": "TextBlock", "text": _cut_bytes(text, 20_000), "wrap": True})
        card = {
            "type": "AdaptiveCard",
            "version": "1.4",
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "body": body,
        }
        return {
            "type": "message",
            "attachments": [
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
            ],
        }
