# cpu-all: build, test, measure. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
MUSL := x86_64-unknown-linux-musl
STATIC_BIN := $(TARGET_DIR)/$(MUSL)/release/cpu-all
PREFIX ?= /usr/local
SYSTEMD_UNIT_DIR_SET := $(SYSTEMD_UNIT_DIR)
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
INITRAMFS ?= $(TARGET_DIR)/cpu-all-initramfs.cpio.gz
APPLETS := cpu cpud decpu decpud
# ring builds C for musl: plain gcc works when musl-gcc is absent (no libc headers needed).
export CC_x86_64_unknown_linux_musl ?= $(shell command -v musl-gcc >/dev/null 2>&1 && echo musl-gcc || echo gcc)

# Every skipped test appends a line here (tests/common/skip.rs, tests/vm/all); the test targets
# end with tools/skip-summary. SKIP_FRESH=0 keeps the lines of earlier stages (make test).
SKIP_LOG ?= $(abspath $(TARGET_DIR))/skipped.log
export CPU_ALL_SKIP_LOG := $(SKIP_LOG)
SKIP_FRESH ?= 1
skip_reset = $(if $(filter 0,$(SKIP_FRESH)),,@mkdir -p $(dir $(SKIP_LOG)) && rm -f $(SKIP_LOG))
skip_summary = $(if $(filter 0,$(SKIP_FRESH)),,@tools/skip-summary $(SKIP_LOG))

.PHONY: all build static install size test unit lint fmt vmtest demo bench help initramfs setup setup-demo

all: build

build: ## debug build of target/debug/cpu-all
	$(CARGO) build

static: ## fully static x86_64 musl release binary
	@rustup target list --installed 2>/dev/null | grep -qx $(MUSL) || rustup target add $(MUSL)
	$(CARGO) build --release --target $(MUSL)
	@file $(STATIC_BIN) 2>/dev/null | grep -Eq 'static(-pie)? linked' || { echo "error: $(STATIC_BIN) is not statically linked"; file $(STATIC_BIN); exit 1; }
	@echo "$(STATIC_BIN): $$(stat -c %s $(STATIC_BIN)) bytes"

install: static ## install cpu-all and the applet links into $(PREFIX)/bin (INSTALL_SERVICES=1: also enable-able service files)
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(STATIC_BIN) $(DESTDIR)$(PREFIX)/bin/cpu-all
	for a in $(APPLETS); do ln -sf cpu-all $(DESTDIR)$(PREFIX)/bin/$$a; done
	install -d $(DESTDIR)$(PREFIX)/share/cpu-all/service
	install -m 0644 service/cpud.service $(DESTDIR)$(PREFIX)/share/cpu-all/service/cpud.service
	install -m 0755 service/cpud.init $(DESTDIR)$(PREFIX)/share/cpu-all/service/cpud.init
	@if [ "$(INSTALL_SERVICES)" = 1 ]; then \
		if [ -d /run/systemd/system ] || [ -n "$(SYSTEMD_UNIT_DIR_SET)" ]; then \
			install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR); \
			sed 's|/usr/local/bin/|$(PREFIX)/bin/|' service/cpud.service >$(DESTDIR)$(SYSTEMD_UNIT_DIR)/cpud.service; \
			echo "installed $(DESTDIR)$(SYSTEMD_UNIT_DIR)/cpud.service (systemctl enable --now cpud)"; \
		else \
			install -d $(DESTDIR)/etc/init.d; \
			sed 's|^CPUD=/usr/local/bin/cpud|CPUD=$(PREFIX)/bin/cpud|' service/cpud.init >$(DESTDIR)/etc/init.d/cpud; \
			chmod 0755 $(DESTDIR)/etc/init.d/cpud; \
			echo "installed $(DESTDIR)/etc/init.d/cpud"; \
		fi; \
	fi

size: static ## print the static binary's size in bytes
	@stat -c %s $(STATIC_BIN)

setup: ## install what make test needs on a fresh Debian machine (apt packages, rustup parts)
	tools/setup-host test

setup-demo: ## install only what make demo needs (qemu, busybox-static, cpio, the musl target)
	tools/setup-host demo

fmt:
	$(CARGO) fmt --all

lint: ## rustfmt check, clippy -D warnings, and every test skip going through the counted helper
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	tools/check-skips

unit: ## every cargo test (unit, in-process and black-box); ends with the skips and why
	$(skip_reset)
	$(CARGO) test --no-fail-fast
	$(skip_summary)

# The stages one after the other, each timed; the skips of all of them are summed up at the
# end, also when a stage failed.
test: ## the full test suite (what CI runs): setup, lint, unit, vmtest
	@mkdir -p $(dir $(SKIP_LOG)) && rm -f $(SKIP_LOG); rc=0; times=""; \
	for stage in setup lint unit vmtest; do \
		start=$$(date +%s); \
		if ! $(MAKE) --no-print-directory SKIP_FRESH=0 $$stage; then rc=1; times="$$times $$stage:FAILED"; break; fi; \
		times="$$times $$stage:$$(( $$(date +%s) - start ))s"; \
	done; \
	echo "make test stages:$$times"; tools/skip-summary $(SKIP_LOG); \
	if [ $$rc = 0 ]; then echo "make test: PASS"; else echo "make test: FAIL"; fi; exit $$rc

vmtest: static ## system tests in qemu VMs (each group skips with a reason when qemu is missing)
	$(skip_reset)
	$(CARGO) build --release --target $(MUSL) --example transport_echo
	tests/vm/all $(STATIC_BIN)
	$(skip_summary)

demo: setup-demo static ## boot a VM running cpud and run cpu against it
	@if [ -x vm/demo ]; then vm/demo $(STATIC_BIN); else echo "demo: not available yet"; exit 1; fi

bench: static ## figures for speed and size, compared with bench/baseline.txt
	bench/run $(STATIC_BIN)

initramfs: static ## initramfs with cpud as /init: make initramfs KEY=key.pub [EXTRA="src:/dst ..."] [MODDIR=/lib/modules/V MODULES="9p virtio_net"] [FLAGS="-d -poweroff"] [INITRAMFS=out]
	@[ -n "$(KEY)" ] || { echo "usage: make initramfs KEY=path/to/key.pub [EXTRA=src:/dst ...] [MODDIR=... MODULES=...] [FLAGS=...]"; exit 2; }
	vm/mkinitramfs -b $(STATIC_BIN) -k "$(KEY)" -o "$(INITRAMFS)" $(if $(STATE),-s "$(STATE)") \
		$(foreach e,$(EXTRA),-e "$(e)") $(if $(MODDIR),-M "$(MODDIR)") $(foreach m,$(MODULES),-m "$(m)") \
		$(foreach f,$(FLAGS),-f "$(f)")

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'
