# cpu-all: build, test, measure. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
MUSL := x86_64-unknown-linux-musl
STATIC_BIN := $(TARGET_DIR)/$(MUSL)/release/cpu-all
PREFIX ?= /usr/local
APPLETS := cpu cpud decpu decpud
# ring builds C for musl: plain gcc works when musl-gcc is absent (no libc headers needed).
export CC_x86_64_unknown_linux_musl ?= $(shell command -v musl-gcc >/dev/null 2>&1 && echo musl-gcc || echo gcc)

.PHONY: all build static install size test unit lint fmt vmtest demo bench help initramfs setup

all: build

build: ## debug build of target/debug/cpu-all
	$(CARGO) build

static: ## fully static x86_64 musl release binary
	@rustup target list --installed 2>/dev/null | grep -qx $(MUSL) || rustup target add $(MUSL)
	$(CARGO) build --release --target $(MUSL)
	@file $(STATIC_BIN) 2>/dev/null | grep -Eq 'static(-pie)? linked' || { echo "error: $(STATIC_BIN) is not statically linked"; file $(STATIC_BIN); exit 1; }
	@echo "$(STATIC_BIN): $$(stat -c %s $(STATIC_BIN)) bytes"

install: static ## install cpu-all and the applet links into $(PREFIX)/bin
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(STATIC_BIN) $(DESTDIR)$(PREFIX)/bin/cpu-all
	for a in $(APPLETS); do ln -sf cpu-all $(DESTDIR)$(PREFIX)/bin/$$a; done

size: static ## print the static binary's size in bytes
	@stat -c %s $(STATIC_BIN)

setup: ## install what a fresh Debian machine lacks (apt packages, the musl target)
	tools/setup-host

fmt:
	$(CARGO) fmt --all

lint: ## rustfmt check and clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

unit: ## every cargo test (unit, in-process and black-box)
	$(CARGO) test

test: setup lint unit vmtest ## the full test suite (what CI runs)

vmtest: static ## system tests in a qemu VM (skipped with a reason when qemu is missing)
	@if [ -x tests/vm/run-vm-tests ]; then tests/vm/run-vm-tests $(STATIC_BIN); else echo "vmtest: no VM tests yet"; fi

demo: setup static ## boot a VM running cpud and run cpu against it
	@if [ -x vm/demo ]; then vm/demo $(STATIC_BIN); else echo "demo: not available yet"; exit 1; fi

bench: static ## figures for speed and size, compared with bench/baseline.txt
	bench/run $(STATIC_BIN)

help:
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'
