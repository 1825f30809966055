"""Settings of the bot processes that the multi-process tests start: the test settings, plus
the docbot settings that config/settings.py does not read from the environment yet."""

import os

from config.settings_test import *  # noqa: F403

DOCBOT_UPDATE_CLAIM_SECONDS = float(os.environ.get("DOCBOT_UPDATE_CLAIM_SECONDS", "30"))
