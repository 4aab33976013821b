"""SMS providers against a real loopback HTTP server: Twilio REST and the generic JSON gateway."""

from __future__ import annotations

import base64
import socket

import pytest

from _support.http_server import Reply
from dotmac.communications.errors import (
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    OperationTimeoutError,
    PermanentDeliveryError,
    RecipientUnregisteredError,
)
from dotmac.communications.notifications._models import OutboundMessage
from dotmac.communications.notifications.channels.sms import (
    HttpSmsProvider,
    TwilioProvider,
    normalize_e164,
)

TO = "+14155550100"
FROM = "+14155550199"


def sms(recipient: str = TO, text: str | None = "hello there", **kwargs) -> OutboundMessage:
    return OutboundMessage(
        notification_id="n-1", channel="sms", recipient=recipient, text=text, **kwargs
    )


def twilio(server, **kwargs) -> TwilioProvider:
    options = {
        "account_sid": "AC0123",
        "auth_token": "s3cret",
        "from_number": FROM,
        "base_url": server.url,
    }
    options.update(kwargs)
    return TwilioProvider(**options)


BAD_NUMBERS = ["12345", "+1555", "not a number", "+", "4155550100", "+447700900123"]


# --- normalize_e164 -----------------------------------------------------------------------


def test_normalize_e164_strips_formatting():
    """International numbers with spaces, dashes or parentheses come back in E.164 form."""
    assert normalize_e164("+44 20 7946 0958") == "+442079460958"
    assert normalize_e164(" +1 (415) 555-0100 ") == TO


@pytest.mark.parametrize("number", BAD_NUMBERS)
def test_normalize_e164_refuses_bad_numbers_naming_them(number):
    """Numbers without '+', impossible or invalid ones raise InvalidRecipientError naming them."""
    with pytest.raises(InvalidRecipientError, match="phone number") as caught:
        normalize_e164(number)
    assert repr(number) in str(caught.value)


# --- Twilio ---------------------------------------------------------------------------------


async def test_twilio_posts_the_form_with_basic_auth(http_server):
    """Twilio gets POST /2010-04-01/Accounts/{sid}/Messages.json, To/From/Body, basic auth."""
    http_server.enqueue(Reply(201, {"sid": "SM42", "status": "queued"}))
    async with twilio(http_server) as provider:
        receipt = await provider.send(sms("+44 20 7946 0958"))
    (request,) = http_server.requests
    assert request.method == "POST"
    assert request.path == "/2010-04-01/Accounts/AC0123/Messages.json"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert (
        request.headers["authorization"] == "Basic " + base64.b64encode(b"AC0123:s3cret").decode()
    )
    assert request.form() == {"To": ["+442079460958"], "From": [FROM], "Body": ["hello there"]}
    assert receipt.provider_message_id == "SM42"
    assert receipt.detail == "queued"


async def test_twilio_messaging_service_and_sender_override(http_server):
    """Without a number, MessagingServiceSid is sent; message.sender overrides from_number."""
    http_server.enqueue(Reply(201, {"sid": "SM1"}), Reply(201, {"sid": "SM2"}))
    service = twilio(http_server, from_number=None, messaging_service_sid="MG77")
    async with service:
        await service.send(sms(text="one"))
    async with twilio(http_server) as provider:
        await provider.send(sms(text="two", sender="+44 20 7946 0958"))
    first, second = http_server.requests
    assert first.form() == {"To": [TO], "MessagingServiceSid": ["MG77"], "Body": ["one"]}
    assert second.form() == {"To": [TO], "From": ["+442079460958"], "Body": ["two"]}


@pytest.mark.parametrize("number", BAD_NUMBERS)
async def test_twilio_refuses_bad_numbers_before_any_request(http_server, number):
    """validate() and send() refuse a bad number; the server sees no request."""
    provider = twilio(http_server)
    with pytest.raises(InvalidRecipientError, match="phone number"):
        provider.validate(number)
    with pytest.raises(InvalidRecipientError, match="phone number"):
        await provider.send(sms(number))
    with pytest.raises(InvalidRecipientError, match="phone number"):
        await provider.send(sms(TO, sender=number))
    await provider.aclose()
    assert http_server.requests == []


async def test_twilio_needs_text(http_server):
    """A message without text is refused (permanent) without a request."""
    provider = twilio(http_server)
    with pytest.raises(PermanentDeliveryError, match="sms needs text"):
        await provider.send(sms(text=None))
    await provider.aclose()
    assert http_server.requests == []


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"from_number": None}, "from_number or messaging_service_sid"),
        ({"from_number": "555-0100"}, "from_number"),
        ({"auth_token": ""}, "auth_token is required"),
        ({"account_sid": "AC/../x"}, "account_sid must be letters and digits"),
        ({"base_url": "ftp://api.twilio.com"}, "base_url must be an http"),
    ],
)
def test_twilio_configuration_errors(http_server, kwargs, problem):
    """Bad configuration raises ConfigurationError naming the field."""
    with pytest.raises(ConfigurationError, match=problem):
        twilio(http_server, **kwargs)


async def test_twilio_invalid_to_error_is_permanent_with_code(http_server):
    """Twilio 400 code 21211 is an InvalidRecipientError carrying Twilio's code and message."""
    http_server.enqueue(
        Reply(
            400,
            {
                "code": 21211,
                "message": "The 'To' number +14155550100 is not a valid phone number.",
                "more_info": "https://www.twilio.com/docs/errors/21211",
                "status": 400,
            },
        )
    )
    async with twilio(http_server) as provider:
        with pytest.raises(InvalidRecipientError) as caught:
            await provider.send(sms())
    assert "Twilio error 21211" in str(caught.value)
    assert "is not a valid phone number" in str(caught.value)
    assert not caught.value.transient


async def test_twilio_opted_out_recipient_is_unregistered(http_server):
    """Twilio 21610 (recipient replied STOP) raises RecipientUnregisteredError."""
    http_server.enqueue(Reply(400, {"code": 21610, "message": "Attempt to send to unsubscribed"}))
    async with twilio(http_server) as provider:
        with pytest.raises(RecipientUnregisteredError, match="21610"):
            await provider.send(sms())


async def test_twilio_other_client_errors_are_permanent(http_server):
    """Other Twilio codes (20003 bad credentials) are plain permanent errors with the code."""
    http_server.enqueue(Reply(401, {"code": 20003, "message": "Authenticate"}))
    async with twilio(http_server) as provider:
        with pytest.raises(PermanentDeliveryError, match="Twilio error 20003") as caught:
            await provider.send(sms())
    assert type(caught.value) is PermanentDeliveryError


async def test_twilio_server_errors_are_transient(http_server):
    """500 (non-JSON) is transient; 429 carries Retry-After and Twilio's code."""
    http_server.enqueue(
        Reply(500, "upstream broke"),
        Reply(429, {"code": 20429, "message": "Too Many Requests"}, {"Retry-After": "7"}),
    )
    async with twilio(http_server) as provider:
        with pytest.raises(DeliveryError, match=r"HTTP 500.*upstream broke") as first:
            await provider.send(sms())
        with pytest.raises(DeliveryError, match="Twilio error 20429") as second:
            await provider.send(sms())
    assert first.value.transient
    assert second.value.transient
    assert second.value.retry_after == 7.0


async def test_twilio_deadline_and_unreachable_host(http_server):
    """A hanging server hits the total deadline; a closed port is a transient DeliveryError."""
    http_server.enqueue(Reply(201, {"sid": "late"}, delay=2.0))
    async with twilio(http_server, timeout=0.3) as provider:
        with pytest.raises(OperationTimeoutError, match=r"within 0\.3s"):
            await provider.send(sms())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with twilio(http_server, base_url=f"http://127.0.0.1:{port}") as provider:
        with pytest.raises(DeliveryError, match="cannot reach") as caught:
            await provider.send(sms())
    assert caught.value.transient


# --- generic HTTP gateway -----------------------------------------------------------------


async def test_http_sms_substitutes_nested_placeholders(http_server):
    """Placeholders are replaced at any depth, once; the auth header and id path are used."""
    http_server.enqueue(Reply(202, {"result": {"ids": ["gw-9"]}}))
    template = {
        "messages": [
            {"to": "{to}", "from": "{from}", "text": "{body}", "ref": "n:{id}", "parts": 1},
            ["{to}", True, None],
        ],
        "meta": {"note": "keep {other} and {to}{to}"},
    }
    provider = HttpSmsProvider(
        url=f"{http_server.url}/send",
        body_template=template,
        from_number=FROM,
        auth_header=("Authorization", "Bearer tok"),
        message_id_field="result.ids.0",
    )
    async with provider:
        receipt = await provider.send(sms("+44 20 7946 0958", text="hi {to} {from} {"))
    (request,) = http_server.requests
    assert request.method == "POST"
    assert request.path == "/send"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "messages": [
            {
                "to": "+442079460958",
                "from": FROM,
                "text": "hi {to} {from} {",
                "ref": "n:n-1",
                "parts": 1,
            },
            ["+442079460958", True, None],
        ],
        "meta": {"note": "keep {other} and +442079460958+442079460958"},
    }
    assert receipt.provider_message_id == "gw-9"
    assert receipt.detail == "HTTP 202"


async def test_http_sms_missing_id_is_not_an_error(http_server):
    """A 2xx without the id field still counts as sent, with no provider id."""
    http_server.enqueue(Reply(200, "OK"))
    provider = HttpSmsProvider(
        url=http_server.url, method="put", body_template={"to": "{to}"}, message_id_field="id"
    )
    async with provider:
        receipt = await provider.send(sms())
    assert http_server.requests[0].method == "PUT"
    assert receipt.provider_message_id is None
    assert "no id at 'id'" in (receipt.detail or "")


async def test_http_sms_from_placeholder_needs_a_sender(http_server):
    """{from} with no sender anywhere is a permanent error, and nothing is sent."""
    provider = HttpSmsProvider(url=http_server.url, body_template={"from": "{from}"})
    with pytest.raises(PermanentDeliveryError, match=r"uses \{from\}"):
        await provider.send(sms())
    with pytest.raises(InvalidRecipientError):
        await provider.send(sms("12345"))
    await provider.aclose()
    assert http_server.requests == []


async def test_http_sms_status_mapping(http_server):
    """503 is transient with Retry-After, 400 is permanent."""
    http_server.enqueue(Reply(503, "busy", {"Retry-After": "3"}), Reply(400, "bad"))
    async with HttpSmsProvider(url=http_server.url, body_template={"t": "{body}"}) as provider:
        with pytest.raises(DeliveryError) as busy:
            await provider.send(sms())
        with pytest.raises(PermanentDeliveryError, match="HTTP 400"):
            await provider.send(sms())
    assert busy.value.transient
    assert busy.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"method": "GET"}, "method must be POST, PUT or PATCH"),
        ({"url": "not a url"}, "url must be an http"),
        ({"body_template": {}}, "non-empty mapping"),
        ({"body_template": {"x": object()}}, "not JSON-serialisable"),
        ({"auth_header": ("X-Key", "a\r\nInjected: 1")}, "no CR/LF"),
        ({"from_number": "0800 123"}, "from_number"),
    ],
)
def test_http_sms_configuration_errors(kwargs, problem):
    """Bad gateway configuration raises ConfigurationError naming the problem."""
    options = {"url": "https://sms.example/send", "body_template": {"to": "{to}"}}
    options.update(kwargs)
    with pytest.raises(ConfigurationError, match=problem):
        HttpSmsProvider(**options)
