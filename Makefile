# The README's two commands. Each first checks for the system packages that
# building RocksDB needs (.ci/deps: installs them as root on Debian, or stops
# with the command that does), then runs cargo. Both use the dev build, so
# RocksDB's C++ is compiled once for the two (see the profiles in Cargo.toml).
#
#   make demo                       # 1 000 000 messages in a temporary store
#   make demo ARGS="5000000 ./dedup-demo"
#   make test

CARGO ?= cargo
ARGS ?=

.PHONY: demo test deps

demo: deps
	$(CARGO) run --example demo -- $(ARGS)

test: deps
	$(CARGO) test

deps:
	@.ci/deps
