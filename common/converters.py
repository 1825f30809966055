"""URL path converters built on the shared parsers, registered by `CommonConfig.ready()`.

`<id:name>` is a database id: ASCII digits within int64 (Django's `<int:>` matches any run of
digits, so an id past int64 reached the database and failed there). `<ident:name>` is an
identifier in the shared charset `[A-Za-z0-9._:-]{1,64}`. A path that does not fit is a 404.
"""

from common import parsers


class IdConverter:
    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        try:
            return parsers.integer(value, field="id", min_value=0)
        except parsers.InvalidValue:
            raise ValueError(value) from None

    def to_url(self, value: int) -> str:
        return str(value)


class IdentifierConverter:
    regex = "[A-Za-z0-9._:-]{1,64}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value
