"""The settings of the hal0 processes the tests start (tests.harness.Stack): hal0's own,
with a fast password hasher first. Django's PBKDF2 takes ~0.25 s of CPU per hash by
design, and the suite's logins and admin users would spend minutes of CI on it; nothing
here tests the hash itself (Django's documented advice for test suites). The default
hashers stay listed, so hashes hal0 stored in production mode still check."""

from django.conf import global_settings

from hal0site.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher",
                    *global_settings.PASSWORD_HASHERS]
