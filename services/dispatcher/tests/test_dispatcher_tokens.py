"""Tokens minted the fast way are the very strings `LinkSigner.sign` makes, and verify."""

import random
import string
import uuid

import pytest

from dispatcher.tokens import TokenMint, message_part
from herald.links import ClickToken, LinkSigner, OpenToken, UnsubscribeToken

KEYS = "new:newest-secret,old:older-secret"
SIGNER = LinkSigner.from_spec(KEYS)

URLS = [
    "https://example.com/",
    "http://example.com/a?x=1&y=2#frag",
    "https://example.com/ünïcode/路径?q=☃",
    'https://example.com/"quoted"/\\back\\slash',
    "https://example.com/" + "long/" * 300,
    "https://example.com/\u2028line\u2029separators\x7f",
]


def random_url(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "/?&=#%-_.~:@!$'()*+,;\"\\ éß中🎉"
    return "https://e.example/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))


def test_open_and_click_tokens_equal_the_signers():
    mint = TokenMint(KEYS)
    rng = random.Random(7)
    for _ in range(50):
        email_id, account_id, message_id = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
        tokens = mint.for_email(email_id=email_id, account_id=account_id)
        part = message_part(message_id)
        assert tokens.open(part) == SIGNER.sign(
            "open", OpenToken(m=message_id, e=email_id, a=account_id)
        )
        for index, url in enumerate([*URLS, random_url(rng), random_url(rng)]):
            for _ in range(2):  # the second time from the cache
                token = tokens.click(part, index, url)
                expected = ClickToken(m=message_id, e=email_id, a=account_id, i=index, u=url)
                assert token == SIGNER.sign("click", expected)
                assert SIGNER.verify("click", token, ClickToken) == expected
                assert SIGNER.verify("open", token, OpenToken) is None


@pytest.mark.parametrize(
    "recipient", ["a@example.com", 'we"ird\\@example.com', "ünï@例え.jp", "x" * 200 + "@e.com"]
)
def test_unsubscribe_tokens_equal_the_signers(recipient: str):
    mint = TokenMint(KEYS)
    email_id, account_id = uuid.uuid4(), uuid.uuid4()
    tokens = mint.for_email(email_id=email_id, account_id=account_id)
    expected = UnsubscribeToken(a=account_id, r=recipient, e=email_id)
    assert tokens.unsubscribe(recipient) == SIGNER.sign("unsubscribe", expected)
    assert tokens.unsubscribe(recipient) == mint.unsubscribe(
        account_id=account_id, recipient=recipient, email_id=email_id
    )
    assert SIGNER.verify("unsubscribe", tokens.unsubscribe(recipient), UnsubscribeToken) == expected


def test_tokens_are_signed_with_the_newest_key():
    mint = TokenMint(KEYS)
    tokens = mint.for_email(email_id=uuid.uuid4(), account_id=uuid.uuid4())
    assert tokens.open(message_part(str(uuid.uuid4()))).split(".")[1] == "new"


def test_message_ids_must_be_canonical_uuids():
    with pytest.raises(ValueError, match="UUID"):
        message_part("short")
