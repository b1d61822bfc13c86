"""All SQL of the relay, behind one narrow class: `DatabaseConnection`.

The relay uses its own psycopg 3 async connections built from Django's `DATABASES`, never the
ORM inside its loop.
"""

from __future__ import annotations

from psycopg.conninfo import make_conninfo

# Keys of Django's OPTIONS that configure the Django backend, not libpq.
DJANGO_ONLY_OPTIONS = {"isolation_level", "pool", "server_side_binding", "assume_role"}


def conninfo_from_django(settings_dict: dict) -> str:
    """A libpq connection string for one entry of Django's `DATABASES`."""
    params = {
        "dbname": settings_dict.get("NAME"),
        "user": settings_dict.get("USER"),
        "password": settings_dict.get("PASSWORD"),
        "host": settings_dict.get("HOST"),
        "port": settings_dict.get("PORT"),
    }
    options = settings_dict.get("OPTIONS") or {}
    params.update({k: v for k, v in options.items() if k not in DJANGO_ONLY_OPTIONS})
    return make_conninfo(**{k: str(v) for k, v in params.items() if v not in (None, "")})
