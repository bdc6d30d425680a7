"""Write the JSON Schemas of every event into schemas/v<N>/ (run by `make schemas`)."""

from __future__ import annotations

import json

from recstream.config import REPO_ROOT
from recstream.contracts.events import SCHEMA_VERSION, json_schemas


def schema_dir():
    return REPO_ROOT / "schemas" / f"v{SCHEMA_VERSION}"


def render() -> dict[str, str]:
    schemas = json_schemas()
    return {f"{name}.json": json.dumps(s, indent=2, sort_keys=True) + "\n" for name, s in schemas.items()}


def main() -> None:
    out = schema_dir()
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in render().items():
        (out / fname).write_text(text)
    print(f"wrote {len(render())} schemas to {out}")


if __name__ == "__main__":
    main()
