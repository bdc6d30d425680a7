"""``python -m infra.kafka`` (the Makefile's ``kafka-jars`` target) is the same CLI as ``infra.kafka_broker``."""

from infra.kafka_broker import main

main()
