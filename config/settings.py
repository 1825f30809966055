"""The one settings module: every knob comes from the environment (django-environ).

Defaults run the whole system embedded (SQLite, in-memory channel layer, local-memory cache,
eager Celery). Setting DATABASE_URL, REDIS_URL and CELERY_BROKER_URL switches each to the real
service. Malformed values fail loudly at import time.
"""

import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from dotenv import dotenv_values

BASE_DIR = Path(__file__).resolve().parent.parent


class _SetVariables(Mapping[str, str]):
    """The process environment without its empty variables: `KEY=` (in `.env`, or exported as
    compose's `${KEY:-}` does) means "unset, use the default", as `.env.example` says."""

    def __getitem__(self, key: str) -> str:
        value = os.environ[key]
        if value == "":
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key, value in os.environ.items() if value != "")

    def __len__(self) -> int:
        return sum(1 for _ in self)


env = environ.Env()
env.ENVIRON = _SetVariables()
# `.env` (or the file QUINTET_ENV_FILE names) is parsed by python-dotenv (quotes, `export`,
# inline ` # comments`), the de facto dotenv syntax `.env.example` is written in; the process
# environment wins over the file.
ENV_FILE = Path(os.environ.get("QUINTET_ENV_FILE") or BASE_DIR / ".env")
for _key, _value in dotenv_values(ENV_FILE).items():
    if _value and not os.environ.get(_key):
        os.environ[_key] = _value

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="embedded-dev-key-never-use-in-production")
if not DEBUG and SECRET_KEY.startswith("embedded-dev-key"):
    raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Network addresses of the processes.
BIND_HOST = env.str("BIND_HOST", default="127.0.0.1")
HTTP_PORT = env.int("HTTP_PORT", default=8000)
VMCONTROL_PORT = env.int("VMCONTROL_PORT", default=9100)
GRPC_PORT = env.int("GRPC_PORT", default=50051)
METRICS_PORT = env.int("METRICS_PORT", default=0)
METRICS_BEARER_TOKEN = env.str("METRICS_BEARER_TOKEN", default="")
# /metrics and the detail of /readyz: staff or the bearer token unless this opens them.
OPS_ENDPOINTS_PUBLIC = env.bool("OPS_ENDPOINTS_PUBLIC", default=False)
# Reverse proxies in front of the web process that append to X-Forwarded-For; 0 = trust none,
# the client address is the socket's (common/network.py).
TRUSTED_PROXY_HOPS = env.int("TRUSTED_PROXY_HOPS", default=0)
if TRUSTED_PROXY_HOPS < 0:
    raise ImproperlyConfigured("TRUSTED_PROXY_HOPS must be >= 0")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "servestatic.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "axes",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "django_structlog",
    "channels",
    "common",
    "realtime",
    "vmcontrol",
    "warehouse",
    "docbot",
    "betting",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Development serves static files from the apps' folders (finders); production serves the
    # collected STATIC_ROOT around Django instead (common/static.py), so the chain stays sync.
    *(["servestatic.middleware.ServeStaticMiddleware"] if DEBUG else []),
    "common.middleware.CorrelationIdMiddleware",
    "common.middleware.JsonErrorMiddleware",
    "django_structlog.middlewares.RequestMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    "axes.middleware.AxesMiddleware",
    "common.middleware.SyncChainMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # Refuses locked-out credentials before the password is even checked (django-axes).
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite by default; DATABASE_URL=postgres://... for PostgreSQL through psycopg 3.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DATABASE_IS_POSTGRES = DATABASES["default"]["ENGINE"].endswith("postgresql")
if DATABASE_IS_POSTGRES:
    # Under ASGI every request runs its sync code in a fresh thread, so per-thread persistent
    # connections are reconnected per request; a pool is what keeps connections open (measured:
    # a trivial authenticated view went from 149 to 271 req/s on two workers).
    if env.bool("DATABASE_POOL", default=True):
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env.int("DATABASE_POOL_MIN", default=2),
            "max_size": env.int("DATABASE_POOL_MAX", default=20),
            "timeout": 10,
        }
    else:
        DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    # One process with many threads writes to SQLite in `make run`: WAL and an immediate
    # write lock turn "database is locked" races into short waits.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: cache + channel layer when REDIS_URL is set; local memory otherwise.
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            # Reads miss and writes drop while Redis is unreachable (common/cache.py).
            "BACKEND": "common.cache.FailOpenRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="quintet"),
            "OPTIONS": {
                "socket_connect_timeout": env.float("REDIS_CONNECT_TIMEOUT", default=0.5),
                "socket_timeout": env.float("REDIS_SOCKET_TIMEOUT", default=1.0),
            },
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": env.str("CHANNEL_LAYER_PREFIX", default="quintet"),
                "capacity": env.int("CHANNEL_LAYER_CAPACITY", default=1000),
                "expiry": 60,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env.int("CHANNEL_LAYER_CAPACITY", default=1000)},
        }
    }

# Celery on RabbitMQ when CELERY_BROKER_URL is set; tasks run in-process (eager) otherwise.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=300)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=240)
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "quintet.default"
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {}
CELERY_TIMEZONE = "UTC"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "var" / "static")
MEDIA_URL = "media/"
MEDIA_ROOT = env.path("MEDIA_ROOT", default=BASE_DIR / "var" / "media")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "servestatic.storage.CompressedStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
SERVESTATIC_USE_FINDERS = DEBUG
SERVESTATIC_AUTOREFRESH = DEBUG

# Body and upload caps.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=5 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = env.int("FILE_UPLOAD_MAX_MEMORY_SIZE", default=2 * 1024 * 1024)
DATA_UPLOAD_MAX_NUMBER_FIELDS = 1000

# Security: secure by default whenever DEBUG is off; each flag overridable for a plain-HTTP lab.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^readyz$", r"^metrics$"]
# Only a trusted proxy may tell Django the request came over HTTPS (anyone could send the header).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if TRUSTED_PROXY_HOPS else None
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
X_FRAME_OPTIONS = "DENY"

# REST API.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "common.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["common.json_parser.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "common.schema.AutoSchema",
    "EXCEPTION_HANDLER": "common.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "common.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": [
        "common.throttling.AnonRateThrottle",
        "common.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env.str("API_THROTTLE_ANON", default="600/min"),
        "user": env.str("API_THROTTLE_USER", default="100000/min"),
        "register": env.str("API_THROTTLE_REGISTER", default="10/hour"),
        "login": env.str("API_THROTTLE_LOGIN", default="30/min"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Throttles key anonymous callers by the socket address unless proxies are trusted.
    "NUM_PROXIES": TRUSTED_PROXY_HOPS,
}
API_MAX_PAGE_SIZE = 500

# Failed logins (API token and /admin/login/), counted per account and per client IP by
# django-axes; LOGIN_FAILURE_LIMIT failures lock that account or IP for LOGIN_LOCKOUT_SECONDS.
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=10)
AXES_COOLOFF_TIME = timedelta(seconds=env.int("LOGIN_LOCKOUT_SECONDS", default=900))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "common.network.client_ip"
AXES_LOCKOUT_CALLABLE = "common.api.login_lockout_response"
AXES_VERBOSE = False
# Registration refuses these names (case-insensitive) and any matching RESERVED_USERNAME_PATTERN:
# service identities are made by operator commands, never claimed by signing up.
RESERVED_USERNAMES = env.list(
    "RESERVED_USERNAMES",
    default=["admin", "administrator", "root", "operator", "staff", "support", "system"],
)
RESERVED_USERNAME_PATTERN = env.str(
    "RESERVED_USERNAME_PATTERN", default=r"^(tg[0-9]+|.*-service|service-.*|svc[-_.].*)$"
)

# API tokens expire API_TOKEN_TTL_HOURS after their last use (refreshed at most once a minute),
# and never later than API_TOKEN_MAX_AGE_DAYS after they were issued. Service tokens (the bot's)
# are issued without expiry by their operator command.
REST_KNOX = {
    "AUTH_HEADER_PREFIX": "Token",
    "TOKEN_TTL": timedelta(hours=env.float("API_TOKEN_TTL_HOURS", default=24.0)),
    "AUTO_REFRESH": True,
    "AUTO_REFRESH_MAX_TTL": timedelta(days=env.float("API_TOKEN_MAX_AGE_DAYS", default=30.0)),
    "MIN_REFRESH_INTERVAL": 60,
    "TOKEN_LIMIT_PER_USER": env.int("API_TOKEN_LIMIT_PER_USER", default=100),
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Quintet API",
    "DESCRIPTION": "vmcontrol, realtime, warehouse, docbot and betting on one Django deployment.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {},
    # common.converters: `<id:>` is an int64 database id, `<ident:>` the shared identifier charset.
    "PATH_CONVERTER_OVERRIDES": {
        "id": {"type": "integer", "format": "int64", "minimum": 0},
        "ident": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
    },
}

# Realtime hub.
# Browser origins allowed on /ws/ besides the same origin (an Origin whose scheme, host and port
# are the request's own Host, that host being in ALLOWED_HOSTS): exact `scheme://host[:port]`
# entries (default ports may be omitted), or `*`. Checked for shape at start (realtime/apps.py).
WS_ALLOWED_ORIGINS = env.list("WS_ALLOWED_ORIGINS", default=[])
REALTIME_TICKET_TTL_SECONDS = env.int("REALTIME_TICKET_TTL_SECONDS", default=30)
REALTIME_MAX_FRAME_BYTES = env.int("REALTIME_MAX_FRAME_BYTES", default=16 * 1024)
# The WebSocket server's options (uvicorn), measured by bench/realtime.py: the sans-I/O
# websockets protocol without per-message compression (compression kept ~100 KiB per idle socket
# and compressed every broadcast once per socket); frames over 1 MiB are closed with 1009, those
# between REALTIME_MAX_FRAME_BYTES and it get `frame_too_large`. `runall` and the tests use these;
# the Procfile and compose command lines spell them out (tests/test_deployment_files.py).
ASGI_WEBSOCKET_OPTIONS: dict[str, object] = {
    "ws": "websockets-sansio",
    "ws_per_message_deflate": False,
    "ws_max_size": 1 << 20,
}
REALTIME_MAX_TOPICS_PER_CONNECTION = env.int("REALTIME_MAX_TOPICS_PER_CONNECTION", default=100)
CELERY_BEAT_SCHEDULE["common-api-tokens-purge"] = {
    "task": "common.api_tokens_purge",
    "schedule": env.float("API_TOKEN_PURGE_SECONDS", default=3600.0),
}
CELERY_BEAT_SCHEDULE["realtime-tickets-purge"] = {
    "task": "realtime.tickets_purge",
    "schedule": 600.0,
}
# Realtime messenger.
REALTIME_DEFAULT_ROOM = env.str("REALTIME_DEFAULT_ROOM", default="general")
REALTIME_AUTOJOIN_DEFAULT_ROOM = env.bool("REALTIME_AUTOJOIN_DEFAULT_ROOM", default=True)
REALTIME_MAX_MESSAGE_CHARS = env.int("REALTIME_MAX_MESSAGE_CHARS", default=4000)
REALTIME_MAX_ROOMS_PER_CONNECTION = env.int("REALTIME_MAX_ROOMS_PER_CONNECTION", default=100)
REALTIME_HISTORY_LIMIT = env.int("REALTIME_HISTORY_LIMIT", default=100)
REALTIME_SYNC_LIMIT = env.int("REALTIME_SYNC_LIMIT", default=500)
REALTIME_RECENT_PER_ROOM = env.int("REALTIME_RECENT_PER_ROOM", default=256)
REALTIME_RECENT_ROOMS = env.int("REALTIME_RECENT_ROOMS", default=1000)
REALTIME_SEND_BUFFER_FRAMES = env.int("REALTIME_SEND_BUFFER_FRAMES", default=512)
REALTIME_RATE_PER_SECOND = env.float("REALTIME_RATE_PER_SECOND", default=20.0)
REALTIME_RATE_BURST = env.int("REALTIME_RATE_BURST", default=40)
# Per user, across all of their sockets on every process (one budget in Redis with REDIS_URL):
# at most BURST frames in any BURST/RATE seconds (a sliding window, taken in leases).
REALTIME_USER_RATE_PER_SECOND = env.float("REALTIME_USER_RATE_PER_SECOND", default=40.0)
REALTIME_USER_RATE_BURST = env.int("REALTIME_USER_RATE_BURST", default=80)
# Seconds of continuous rate-limiting (no second without a refused frame) before close 1008.
REALTIME_RATE_STRIKE_SECONDS = env.float("REALTIME_RATE_STRIKE_SECONDS", default=5.0)
REALTIME_PRESENCE_FLUSH_MS = env.int("REALTIME_PRESENCE_FLUSH_MS", default=100)
# With Redis, presence entries of a process expire this long after it last announced them (it
# re-announces every third of it): a killed process's users are gone within the TTL.
REALTIME_PRESENCE_TTL_SECONDS = env.float("REALTIME_PRESENCE_TTL_SECONDS", default=30.0)
# Connect/read timeout of the realtime Redis calls (publish, presence).
REALTIME_REDIS_TIMEOUT_SECONDS = env.float("REALTIME_REDIS_TIMEOUT_SECONDS", default=2.0)
for _name in (
    "REALTIME_RATE_STRIKE_SECONDS",
    "REALTIME_PRESENCE_TTL_SECONDS",
    "REALTIME_REDIS_TIMEOUT_SECONDS",
):
    if not globals()[_name] > 0:
        raise ImproperlyConfigured(f"{_name} must be > 0")
REALTIME_FANOUT_CHANNEL = env.str("REALTIME_FANOUT_CHANNEL", default="quintet:realtime:fanout")

# --- vmcontrol ---
VMCONTROL_SERVER_NAME = env.str("VMCONTROL_SERVER_NAME", default="{host}:{port}")
VMCONTROL_HEARTBEAT_INTERVAL_SECONDS = env.float(
    "VMCONTROL_HEARTBEAT_INTERVAL_SECONDS", default=5.0
)
VMCONTROL_MISSED_HEARTBEATS = env.int("VMCONTROL_MISSED_HEARTBEATS", default=3)
VMCONTROL_AUTH_TIMEOUT_SECONDS = env.float("VMCONTROL_AUTH_TIMEOUT_SECONDS", default=10.0)
VMCONTROL_COMMAND_TIMEOUT_SECONDS = env.float("VMCONTROL_COMMAND_TIMEOUT_SECONDS", default=10.0)
VMCONTROL_LAST_SEEN_FLUSH_INTERVAL_SECONDS = env.float(
    "VMCONTROL_LAST_SEEN_FLUSH_INTERVAL_SECONDS", default=5.0
)
VMCONTROL_ENROLL_SECRET = env.str("VMCONTROL_ENROLL_SECRET", default="")
VMCONTROL_TLS_CERT = env.str("VMCONTROL_TLS_CERT", default="")
VMCONTROL_TLS_KEY = env.str("VMCONTROL_TLS_KEY", default="")
# Guessing limits: failed auth/enroll per connection, then per peer IP (token bucket + lockout).
VMCONTROL_AUTH_ATTEMPTS = env.int("VMCONTROL_AUTH_ATTEMPTS", default=3)
VMCONTROL_AUTH_FAILURE_BURST = env.int("VMCONTROL_AUTH_FAILURE_BURST", default=10)
VMCONTROL_AUTH_FAILURES_PER_MINUTE = env.float("VMCONTROL_AUTH_FAILURES_PER_MINUTE", default=6.0)
VMCONTROL_AUTH_LOCKOUT_SECONDS = env.float("VMCONTROL_AUTH_LOCKOUT_SECONDS", default=60.0)
VMCONTROL_AUTH_LOCKOUT_MAX_SECONDS = env.float("VMCONTROL_AUTH_LOCKOUT_MAX_SECONDS", default=3600.0)
# A server renews its lease every third of this; its VMs are offline once it has lapsed.
VMCONTROL_SERVER_LEASE_TTL_SECONDS = env.float("VMCONTROL_SERVER_LEASE_TTL_SECONDS", default=15.0)
VMCONTROL_REAP_INTERVAL_SECONDS = env.float("VMCONTROL_REAP_INTERVAL_SECONDS", default=30.0)
# The agent (`run_vm_agent`): TLS with the server certificate checked (hostname included).
VMCONTROL_AGENT_TLS = env.bool("VMCONTROL_AGENT_TLS", default=False)
VMCONTROL_AGENT_CA_FILE = env.str("VMCONTROL_AGENT_CA_FILE", default="")
VMCONTROL_AGENT_TLS_SERVER_NAME = env.str("VMCONTROL_AGENT_TLS_SERVER_NAME", default="")
for _name in (
    "VMCONTROL_AUTH_TIMEOUT_SECONDS",
    "VMCONTROL_AUTH_ATTEMPTS",
    "VMCONTROL_AUTH_FAILURE_BURST",
    "VMCONTROL_SERVER_LEASE_TTL_SECONDS",
    "VMCONTROL_REAP_INTERVAL_SECONDS",
):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name} must be > 0")
if VMCONTROL_AUTH_FAILURES_PER_MINUTE < 0 or VMCONTROL_AUTH_LOCKOUT_SECONDS < 0:
    raise ImproperlyConfigured(
        "VMCONTROL_AUTH_FAILURES_PER_MINUTE and _LOCKOUT_SECONDS must be >= 0"
    )
if VMCONTROL_TLS_KEY and not VMCONTROL_TLS_CERT:
    raise ImproperlyConfigured("VMCONTROL_TLS_KEY is set without VMCONTROL_TLS_CERT")
CELERY_BEAT_SCHEDULE["vmcontrol-sessions-reap"] = {
    "task": "vmcontrol.sessions_reap",
    "schedule": VMCONTROL_REAP_INTERVAL_SECONDS,
}

# --- warehouse ---
# Movement queue: the Celery broker's RabbitMQ when configured, else a kombu filesystem queue
# under var/ so `warehouse_produce` in another terminal reaches `make run` with no service.
WAREHOUSE_BROKER_URL = (
    env.str("WAREHOUSE_BROKER_URL", default="") or CELERY_BROKER_URL or "filesystem://"
)
WAREHOUSE_QUEUE_DIR = env.path("WAREHOUSE_QUEUE_DIR", default=BASE_DIR / "var" / "warehouse-queue")
WAREHOUSE_QUEUE = env.str("WAREHOUSE_QUEUE", default="warehouse.movements")
WAREHOUSE_PREFETCH = env.int("WAREHOUSE_PREFETCH", default=6000)
WAREHOUSE_BATCH_SIZE = env.int("WAREHOUSE_BATCH_SIZE", default=2000)
WAREHOUSE_LINGER_MS = env.int("WAREHOUSE_LINGER_MS", default=50)
WAREHOUSE_EMBEDDED_CONSUMER = env.bool("WAREHOUSE_EMBEDDED_CONSUMER", default=not CELERY_BROKER_URL)
WAREHOUSE_STRICT_STOCK = env.bool("WAREHOUSE_STRICT_STOCK", default=False)
WAREHOUSE_PUBLIC_READS = env.bool("WAREHOUSE_PUBLIC_READS", default=True)
# Public reads per client (IP, IPv6 per /64; users by id) per fixed window, "N/s|min|hour|day",
# one budget for both public reads (DRF views); empty = no limit.
WAREHOUSE_READ_THROTTLE = env.str("WAREHOUSE_READ_THROTTLE", default="200000/min")
if WAREHOUSE_READ_THROTTLE == "off":
    WAREHOUSE_READ_THROTTLE = ""
_count, _, _period = WAREHOUSE_READ_THROTTLE.partition("/")
if WAREHOUSE_READ_THROTTLE and not (
    _count.isascii()
    and _count.isdigit()
    and _period[:1] in "smhd"
    and _period.isalpha()
    and _period.isascii()
    and _period.islower()
):
    raise ImproperlyConfigured("WAREHOUSE_READ_THROTTLE must look like 600/min (or be off)")
WAREHOUSE_CACHE_SECONDS = env.int("WAREHOUSE_CACHE_SECONDS", default=300)
WAREHOUSE_HEARTBEAT_SECONDS = env.float("WAREHOUSE_HEARTBEAT_SECONDS", default=2.0)
WAREHOUSE_HEARTBEAT_STALE_SECONDS = env.float("WAREHOUSE_HEARTBEAT_STALE_SECONDS", default=30.0)
WAREHOUSE_READYZ_REQUIRE_CONSUMER = env.bool("WAREHOUSE_READYZ_REQUIRE_CONSUMER", default=False)
if WAREHOUSE_BATCH_SIZE < 1 or WAREHOUSE_PREFETCH < WAREHOUSE_BATCH_SIZE:
    raise ImproperlyConfigured("WAREHOUSE_PREFETCH must be >= WAREHOUSE_BATCH_SIZE >= 1")

# --- docbot ---
TELEGRAM_BOT_TOKEN = env.str("TELEGRAM_BOT_TOKEN", default="")
DOCBOT_MODE = env.str("DOCBOT_MODE", default="polling")
if DOCBOT_MODE not in {"polling", "webhook"}:
    raise ImproperlyConfigured("DOCBOT_MODE must be 'polling' or 'webhook'")
TELEGRAM_WEBHOOK_SECRET = env.str("TELEGRAM_WEBHOOK_SECRET", default="")
TELEGRAM_API_BASE_URL = env.str("TELEGRAM_API_BASE_URL", default="https://api.telegram.org/bot")
TELEGRAM_FILE_BASE_URL = env.str(
    "TELEGRAM_FILE_BASE_URL", default="https://api.telegram.org/file/bot"
)
DOCBOT_BACKEND_URL = env.str("DOCBOT_BACKEND_URL", default=f"http://127.0.0.1:{HTTP_PORT}")
# The service identity is the docbot ServiceAccount row, made by `docbot_service_account` (or
# by the bot's own process when DOCBOT_SERVICE_TOKEN is empty); the username is only its label.
DOCBOT_SERVICE_USERNAME = env.str("DOCBOT_SERVICE_USERNAME", default="docbot-service")
RESERVED_USERNAMES.append(DOCBOT_SERVICE_USERNAME)
DOCBOT_SERVICE_TOKEN = env.str("DOCBOT_SERVICE_TOKEN", default="")
DOCBOT_PUBLIC_BASE_URL = env.str("DOCBOT_PUBLIC_BASE_URL", default=f"http://127.0.0.1:{HTTP_PORT}")
DOCBOT_FLOOD_MAX_PER_SECOND = env.int("DOCBOT_FLOOD_MAX_PER_SECOND", default=5)
DOCBOT_SHARE_LINK_TTL_SECONDS = env.int("DOCBOT_SHARE_LINK_TTL_SECONDS", default=24 * 3600)
DOCBOT_MAX_FILE_BYTES = env.int("DOCBOT_MAX_FILE_BYTES", default=20 * 1024 * 1024)
DOCBOT_STATE_TTL_SECONDS = env.int("DOCBOT_STATE_TTL_SECONDS", default=7 * 24 * 3600)
# Polling mode runs one poller at a time: the holder of this lease (Redis with REDIS_URL, else a
# database row) calls getUpdates and renews it every third of this; a copy on standby takes over
# within this plus a fifth after the holder dies (at once after a clean stop).
DOCBOT_POLL_LEASE_SECONDS = env.float("DOCBOT_POLL_LEASE_SECONDS", default=15.0)
if not DOCBOT_POLL_LEASE_SECONDS > 0:
    raise ImproperlyConfigured("DOCBOT_POLL_LEASE_SECONDS must be > 0")
# An update being handled is claimed for this long, renewed every third of it while its handler
# runs: a process that dies mid-update leaves a claim that expires after this, and the next
# delivery (the poller that takes over, Telegram's webhook retry) handles the update again.
DOCBOT_UPDATE_CLAIM_SECONDS = env.float("DOCBOT_UPDATE_CLAIM_SECONDS", default=30.0)
if not DOCBOT_UPDATE_CLAIM_SECONDS > 0:
    raise ImproperlyConfigured("DOCBOT_UPDATE_CLAIM_SECONDS must be > 0")
DOCBOT_RATE_LIMIT_PER_SECOND = env.float("DOCBOT_RATE_LIMIT_PER_SECOND", default=30.0)
# Without TELEGRAM_BOT_TOKEN, `make run` serves the bot against a built-in Bot API stand-in with a
# staff chat page at /docbot/sandbox/; off with DJANGO_DEBUG=false unless set explicitly.
DOCBOT_SANDBOX = env.bool("DOCBOT_SANDBOX", default=DEBUG)
# The bot keeps dialog state, update-id dedupe marks (24 h) and one-per-group notices in the
# default cache. Django's local-memory backend holds 300 entries and culls a third when full,
# which would forget them under load on the embedded default.
if CACHES["default"]["BACKEND"].endswith(".LocMemCache"):
    CACHES["default"]["OPTIONS"] = {"MAX_ENTRIES": 100_000}

# --- betting ---
BETTING_MIN_STAKE = env.str("BETTING_MIN_STAKE", default="1.00")
BETTING_MAX_STAKE = env.str("BETTING_MAX_STAKE", default="10000.00")
BETTING_MIN_COEFFICIENT = env.str("BETTING_MIN_COEFFICIENT", default="0.01")
BETTING_MAX_COEFFICIENT = env.str("BETTING_MAX_COEFFICIENT", default="1000.00")
BETTING_EVENTS_CACHE_SECONDS = env.float("BETTING_EVENTS_CACHE_SECONDS", default=2.0)
BETTING_GRPC_REFLECTION = env.bool("BETTING_GRPC_REFLECTION", default=DEBUG)
BETTING_WATCH_HEARTBEAT_SECONDS = env.float("BETTING_WATCH_HEARTBEAT_SECONDS", default=5.0)
BETTING_WATCH_POLL_SECONDS = env.float("BETTING_WATCH_POLL_SECONDS", default=0.05)
BETTING_RECONCILE_SECONDS = env.float("BETTING_RECONCILE_SECONDS", default=60.0)
# An Idempotency-Key claim still in flight this long was left by a dead request: a retry takes
# it over (longer than any placement can take: the claim and the bet are one round trip apart).
BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS = env.float(
    "BETTING_IDEMPOTENCY_IN_FLIGHT_SECONDS", default=30.0
)
# gRPC transport (betting/grpc/transport.py): TLS with a PEM certificate chain and key; with a
# client CA as well, clients must present a certificate it signed (mutual TLS). Without TLS a
# non-debug line provider refuses a non-loopback bind host unless plaintext is explicitly allowed
# (staff tokens travel in the call metadata).
BETTING_GRPC_TLS_CERT = env.str("BETTING_GRPC_TLS_CERT", default="")
BETTING_GRPC_TLS_KEY = env.str("BETTING_GRPC_TLS_KEY", default="")
BETTING_GRPC_TLS_CLIENT_CA = env.str("BETTING_GRPC_TLS_CLIENT_CA", default="")
BETTING_GRPC_ALLOW_PLAINTEXT = env.bool("BETTING_GRPC_ALLOW_PLAINTEXT", default=False)
if bool(BETTING_GRPC_TLS_CERT) != bool(BETTING_GRPC_TLS_KEY):
    raise ImproperlyConfigured("BETTING_GRPC_TLS_CERT and BETTING_GRPC_TLS_KEY go together")
if BETTING_GRPC_TLS_CLIENT_CA and not BETTING_GRPC_TLS_CERT:
    raise ImproperlyConfigured("BETTING_GRPC_TLS_CLIENT_CA needs BETTING_GRPC_TLS_CERT and _KEY")
CELERY_BEAT_SCHEDULE["betting-reconcile-settlements"] = {
    "task": "betting.reconcile_settlements",
    "schedule": BETTING_RECONCILE_SECONDS,
}

# --- operator console (/console/) ---
# One publisher samples every panel every CONSOLE_SAMPLE_SECONDS (a beat task; runall's beat loop
# in embedded mode) and keeps CONSOLE_WINDOW_SECONDS of rate points per counter. Each process
# flushes its counters every CONSOLE_FLUSH_SECONDS and writes its heartbeat every
# CONSOLE_HEARTBEAT_SECONDS; three missed heartbeats make it "silent" on the platform panel, and
# it is forgotten CONSOLE_PROCESS_FORGET_SECONDS after its last one. CONSOLE_EXPECTED_PROCESSES
# (e.g. web,asgi,worker,beat,consumer,tcp,grpc,bot) are flagged when none of that kind reports.
CONSOLE_SAMPLE_SECONDS = env.float("CONSOLE_SAMPLE_SECONDS", default=2.0)
CONSOLE_WINDOW_SECONDS = env.int("CONSOLE_WINDOW_SECONDS", default=900)
CONSOLE_FLUSH_SECONDS = env.float("CONSOLE_FLUSH_SECONDS", default=1.0)
CONSOLE_HEARTBEAT_SECONDS = env.float("CONSOLE_HEARTBEAT_SECONDS", default=5.0)
CONSOLE_PROCESS_FORGET_SECONDS = env.int("CONSOLE_PROCESS_FORGET_SECONDS", default=3600)
CONSOLE_READINESS_SECONDS = env.float("CONSOLE_READINESS_SECONDS", default=10.0)
CONSOLE_EXPECTED_PROCESSES = env.list("CONSOLE_EXPECTED_PROCESSES", default=[])
for _name in (
    "CONSOLE_SAMPLE_SECONDS",
    "CONSOLE_WINDOW_SECONDS",
    "CONSOLE_FLUSH_SECONDS",
    "CONSOLE_HEARTBEAT_SECONDS",
    "CONSOLE_PROCESS_FORGET_SECONDS",
    "CONSOLE_READINESS_SECONDS",
):
    if not globals()[_name] > 0:
        raise ImproperlyConfigured(f"{_name} must be > 0")
CELERY_BEAT_SCHEDULE["common-console-publish"] = {
    "task": "common.console_publish",
    "schedule": CONSOLE_SAMPLE_SECONDS,
    "options": {"expires": CONSOLE_SAMPLE_SECONDS},
}

# Observability.
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="console")
if LOG_FORMAT not in {"console", "json"}:
    raise ImproperlyConfigured("LOG_FORMAT must be 'console' or 'json'")
LOG_ERRORS_TO_QUEUE = env.bool("LOG_ERRORS_TO_QUEUE", default=False)
LOG_ERRORS_QUEUE = env.str("LOG_ERRORS_QUEUE", default="ops.errors")
if LOG_ERRORS_TO_QUEUE and not CELERY_BROKER_URL:
    raise ImproperlyConfigured("LOG_ERRORS_TO_QUEUE needs CELERY_BROKER_URL (RabbitMQ)")
DJANGO_STRUCTLOG_CELERY_ENABLED = True
# Keep the id common.middleware.CorrelationIdMiddleware settled (a caller's X-Request-ID, e.g.
# the bot's `tg-<update_id>`) and carry it into Celery tasks.
DJANGO_STRUCTLOG_TRUST_UPSTREAM_REQUEST_ID = True
DJANGO_STRUCTLOG_IP_LOGGING_ENABLED = False
PROMETHEUS_EXPORT_MIGRATIONS = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "structured": {"()": "common.logging.structured_formatter", "fmt": LOG_FORMAT},
    },
    "filters": {"redact_query_secrets": {"()": "common.logging.RedactQuerySecrets"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "structured"},
        "error_queue": {
            "class": "common.logging.ErrorQueueHandler",
            "level": "ERROR",
            "formatter": "structured",
        },
    },
    "root": {
        "handlers": ["console", "error_queue"] if LOG_ERRORS_TO_QUEUE else ["console"],
        "level": LOG_LEVEL,
    },
    "loggers": {
        # One line per request: django_structlog's `request_finished` (its level follows the
        # status) replaces Django's own "Not Found: /x" lines and their DEBUG console handler.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "django.request": {"level": "ERROR"},
        "django.db.backends": {"level": "INFO"},
        "django_structlog": {"level": env.str("LOG_LEVEL_REQUESTS", default="WARNING")},
        "uvicorn.access": {"level": "WARNING", "filters": ["redact_query_secrets"]},
        "uvicorn.error": {"filters": ["redact_query_secrets"]},
        "httpx": {"level": "WARNING"},
        "celery": {"level": "INFO"},
    },
}

# First operator for `make run` (Django's own createsuperuser variables).
DJANGO_SUPERUSER_USERNAME = env.str("DJANGO_SUPERUSER_USERNAME", default="")
DJANGO_SUPERUSER_PASSWORD = env.str("DJANGO_SUPERUSER_PASSWORD", default="")
