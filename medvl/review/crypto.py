"""Patient data at rest in the review store: the uploaded pages, the model's record and every
corrected value are encrypted before they reach the database.

Fernet (AES-128-CBC with an HMAC-SHA256 tag, from ``cryptography``): authenticated, so a
tampered or foreign row fails to decrypt rather than decrypting to garbage. The key comes from
the environment (:data:`KEY_ENV`), never from a file beside the database: a copy of the
database alone reads as noise (tests/test_review_store.py reads the raw rows). Several keys,
comma-separated, rotate: the first encrypts, any of them decrypts.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from medvl.review.errors import ReviewKeyError

KEY_ENV = "MEDVL_REVIEW_KEY"
NEW_KEY_HINT = ("make one with: python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'")


class Cipher:
    """Encrypts and decrypts the store's patient data with the keys in ``keys`` (comma-separated
    Fernet keys; the first encrypts)."""

    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise ReviewKeyError(f"the review store keeps patient documents and needs a key in {KEY_ENV}; {NEW_KEY_HINT}")
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])
        except ValueError as exc:
            raise ReviewKeyError(f"{KEY_ENV} holds a malformed key ({exc}); {NEW_KEY_HINT}") from None

    @classmethod
    def from_env(cls) -> Cipher:
        return cls(os.environ.get(KEY_ENV, ""))

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            raise ReviewKeyError(f"a stored value does not decrypt with the key(s) in {KEY_ENV}: "
                            "the store was written with another key") from None

    def encrypt_json(self, value: Any) -> bytes:
        return self.encrypt(json.dumps(value, ensure_ascii=False).encode())

    def decrypt_json(self, token: bytes) -> Any:
        return json.loads(self.decrypt(token))
