# cpu-all: build, test, measure. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
MUSL := x86_64-unknown-linux-musl
# Board architectures: `make static ARCH=aarch64` (tools/build-static has the toolchain table).
ARCH ?= x86_64
ARCHES := x86_64 aarch64 armv7 riscv64
TRIPLE_x86_64 := x86_64-unknown-linux-musl
TRIPLE_aarch64 := aarch64-unknown-linux-musl
TRIPLE_armv7 := armv7-unknown-linux-musleabihf
TRIPLE_riscv64 := riscv64gc-unknown-linux-musl
TRIPLE := $(TRIPLE_$(ARCH))
ifeq ($(TRIPLE),)
$(error ARCH=$(ARCH) is not one of $(ARCHES))
endif
STATIC_BIN := $(TARGET_DIR)/$(TRIPLE)/release/cpu-all
OCI ?= $(TARGET_DIR)/oci/cpu-all
INITRAMFS ?= $(TARGET_DIR)/cpu-all-initramfs$(if $(filter-out x86_64,$(ARCH)),-$(ARCH)).cpio.gz
PREFIX ?= /usr/local
SYSTEMD_UNIT_DIR_SET := $(SYSTEMD_UNIT_DIR)
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
APPLETS := cpu cpud decpu decpud
# ring builds C for musl: plain gcc works when musl-gcc is absent (no libc headers needed).
export CC_x86_64_unknown_linux_musl ?= $(shell command -v musl-gcc >/dev/null 2>&1 && echo musl-gcc || echo gcc)

.PHONY: all build static static-all oci install size test unit lint fmt vmtest demo bench help initramfs setup

all: build

build: ## debug build of target/debug/cpu-all
	$(CARGO) build

static: ## fully static musl release binary for ARCH (x86_64 default, aarch64, armv7, riscv64)
	@tools/build-static $(ARCH) >/dev/null

static-all: ## static binaries for all four architectures
	@for a in $(ARCHES); do tools/build-static $$a >/dev/null || exit 1; done

oci: static ## OCI image (FROM scratch, entrypoint cpud) of every static build, multi-arch index: $(OCI) and $(OCI).tar
	tools/mkoci $(OCI) $(foreach a,$(ARCHES),$(if $(wildcard $(TARGET_DIR)/$(TRIPLE_$(a))/release/cpu-all),$(a)=$(TARGET_DIR)/$(TRIPLE_$(a))/release/cpu-all))

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

size: static ## size in bytes of ARCH's static binary (built if needed), then of every other one built
	@for a in $(ARCHES); do \
		f=$(TARGET_DIR)/$$(case $$a in x86_64) echo $(TRIPLE_x86_64);; aarch64) echo $(TRIPLE_aarch64);; \
			armv7) echo $(TRIPLE_armv7);; riscv64) echo $(TRIPLE_riscv64);; esac)/release/cpu-all; \
		if [ -f $$f ]; then printf '%-8s %9s bytes  %s\n' $$a $$(stat -c %s $$f) $$f; \
		else printf '%-8s %9s        (make static ARCH=%s)\n' $$a "not built" $$a; fi; \
	done
	@if [ -f $(OCI).tar ]; then printf '%-8s %9s bytes  %s\n' oci $$(stat -c %s $(OCI).tar) $(OCI).tar; fi

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

vmtest: static ## system tests in qemu VMs (each group skips with a reason when qemu is missing)
	$(CARGO) build --release --target $(MUSL) --example transport_echo
	tests/vm/all $(STATIC_BIN)

demo: setup static ## boot a VM running cpud and run cpu against it
	@if [ -x vm/demo ]; then vm/demo $(STATIC_BIN); else echo "demo: not available yet"; exit 1; fi

bench: static ## figures for speed and size, compared with bench/baseline.txt
	bench/run $(STATIC_BIN)

initramfs: static ## initramfs with cpud as /init: make initramfs [ARCH=aarch64] KEY=key.pub [EXTRA="src:/dst ..."] [MODDIR=/lib/modules/V MODULES="9p virtio_net"] [FLAGS="-d -poweroff"] [INITRAMFS=out]
	@[ -n "$(KEY)" ] || { echo "usage: make initramfs KEY=path/to/key.pub [EXTRA=src:/dst ...] [MODDIR=... MODULES=...] [FLAGS=...]"; exit 2; }
	vm/mkinitramfs -b $(STATIC_BIN) -k "$(KEY)" -o "$(INITRAMFS)" $(if $(STATE),-s "$(STATE)") \
		$(foreach e,$(EXTRA),-e "$(e)") $(if $(MODDIR),-M "$(MODDIR)") $(foreach m,$(MODULES),-m "$(m)") \
		$(foreach f,$(FLAGS),-f "$(f)")

help:
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'
