# Convenience entry points; each is one script that also runs on its own.
.PHONY: package test run

# The .deb and .rpm under target/packaging/ (binary linked for glibc 2.31).
package:
	bash packaging/build.sh

# The whole test suite, fixtures included (as root).
test:
	bash tests/run-all.sh

# The agent with embedded defaults (local stand-ins, no root needed).
run:
	cargo run --release -- run --config config/local.toml
