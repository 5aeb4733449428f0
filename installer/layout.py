"""Where hal0 lives on the real system: the paths the installer works on, the systemd
units, the service user and group, and the lemond release it pins.

A leaf module (it imports nothing of the installer), so every other installer module can
use these names. Steps turn them into real paths with `ctx.path(...)`, which puts them
under `--root` when there is one.
"""

LEMONADE_DIR = "/opt/lemonade"
LEMOND_BIN = "/opt/lemonade/lemond"
MARKER = "/opt/lemonade/.installed-version"
STATE_DIR = "/var/lib/hal0"
LEMONADE_STATE = "/var/lib/hal0/lemonade"  # lemond's cache dir: config.json, user_models.json
MODELS_DIR = "/var/lib/hal0/models"  # HF_HOME for lemond's model downloads
STATIC_ROOT = "/var/lib/hal0/static"
DATABASE_FILE = "/var/lib/hal0/hal0.sqlite3"
OVERRIDES_FILE = "/var/lib/hal0/installer-overrides.json"
CONFIG_FILE = "/var/lib/hal0/lemonade/config.json"
USER_MODELS_FILE = "/var/lib/hal0/lemonade/user_models.json"
ENV_DIR = "/etc/hal0"
ENV_FILE = "/etc/hal0/hal0.env"
UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"
LEMONADE_UNIT = "hal0-lemonade.service"
API_UNIT = "hal0-api.service"
# Under --root, the commands that were recorded instead of run are appended here.
RECORD_LOG = "/.hal0-install/recorded-commands.log"

USER = "hal0"
GROUP = "hal0"
EXTRA_GROUPS = ("render", "video")  # GPU device access for lemond's backends

LEMOND_VERSION = "10.6.0"
LEMOND_SHA256 = "3b50b5cc5a9695f970b85f5cf3023297bde215f2230c993134e670baab2474a1"
LEMOND_URL = (
    "https://github.com/lemonade-sdk/lemonade/releases/download/"
    "v{ver}/lemonade-embeddable-{ver}-ubuntu-x64.tar.gz"
)
PLACEHOLDER_SHA256 = "0" * 64
