"""Write the JSON Schemas of every event into schemas/v<N>/ (run by `make schemas`)."""

from __future__ import annotations

import json

from recstream.config import REPO_ROOT
from recstream.contracts.events import ALL_MODELS, SCHEMA_VERSION, json_schemas


def schema_dir():
    return REPO_ROOT / "schemas" / f"v{SCHEMA_VERSION}"


def topic_contract() -> dict[str, object]:
    """What a producer in any language must know beyond the value schemas: key and partitioner."""
    from recstream.contracts.partitioning import PARTITIONER
    from recstream.contracts.topics import DEAD_LETTER_SUFFIX, TOPICS

    files = {model: name for name, model in ALL_MODELS.items()}
    return {
        "partitioner": "Kafka's default: murmur2 of the key bytes (Java's default partitioner; librdkafka "
        f"and kcat: partitioner={PARTITIONER}), partition = (murmur2(key) & 0x7fffffff) % partitions",
        "dead_letters": f"every topic has <topic>{DEAD_LETTER_SUFFIX}; values are dead_letter.json",
        "topics": {
            name: {
                "key": spec.key_field,
                "value_schema": [f"{files[spec.value_type]}.json"]
                if spec.value_type in files
                else ["item_upsert.json", "item_delete.json"],  # the catalog's union, told apart by op
                "partitions": spec.partitions,
                "cleanup_policy": spec.cleanup_policy,
                "placement_checked": spec.keyed_placement,
                "tombstone": "deletes the item with that key" if spec.tombstone else "dead-lettered",
                "description": spec.description,
            }
            for name, spec in TOPICS.items()
        },
    }


def render() -> dict[str, str]:
    schemas = json_schemas()
    out = {f"{name}.json": json.dumps(s, indent=2, sort_keys=True) + "\n" for name, s in schemas.items()}
    out["topics.json"] = json.dumps(topic_contract(), indent=2, sort_keys=True) + "\n"
    return out


def main() -> None:
    out = schema_dir()
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in render().items():
        (out / fname).write_text(text)
    print(f"wrote {len(render())} schemas to {out}")


if __name__ == "__main__":
    main()
