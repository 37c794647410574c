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

.PHONY: all build static install size test unit lint fmt vmtest demo bench help initramfs setup oci

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
	@$(MAKE) --no-print-directory -s oci >/dev/null && cat $(TARGET_DIR)/oci/size.txt

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

initramfs: static ## initramfs with cpud as /init: make initramfs KEY=key.pub [EXTRA="src:/dst ..."] [MODDIR=/lib/modules/V MODULES="9p virtio_net"] [FLAGS="-d -poweroff"] [INITRAMFS=out]
	@[ -n "$(KEY)" ] || { echo "usage: make initramfs KEY=path/to/key.pub [EXTRA=src:/dst ...] [MODDIR=... MODULES=...] [FLAGS=...]"; exit 2; }
	vm/mkinitramfs -b $(STATIC_BIN) -k "$(KEY)" -o "$(INITRAMFS)" $(if $(STATE),-s "$(STATE)") \
		$(foreach e,$(EXTRA),-e "$(e)") $(if $(MODDIR),-M "$(MODDIR)") $(foreach m,$(MODULES),-m "$(m)") \
		$(foreach f,$(FLAGS),-f "$(f)")

help:
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The cpud container image: target/oci/layout (OCI image layout) and target/oci/cpu-all-oci.tar
# (`podman load -i`, `docker load -i`). One image per architecture whose static binary exists
# (amd64 always; arm64 and arm/v7 from `make static ARCH=...`), in one multi-arch index.
# OCI_BUSYBOX_amd64/_arm64/_armv7=PATH add a static busybox's date, cat and sh (amd64: Debian's busybox-static).
OCI_DIR := $(TARGET_DIR)/oci
OCI_TAG ?= latest
OCI_BUSYBOX_amd64 ?= $(shell file -L /bin/busybox 2>/dev/null | grep -q 'x86-64.*statically linked' && echo /bin/busybox)
OCI_AMD64_BIN := $(TARGET_DIR)/$(MUSL)/release/cpu-all
OCI_ARCHES := amd64=$(OCI_AMD64_BIN) \
	$(if $(wildcard $(TARGET_DIR)/aarch64-unknown-linux-musl/release/cpu-all),arm64=$(TARGET_DIR)/aarch64-unknown-linux-musl/release/cpu-all) \
	$(if $(wildcard $(TARGET_DIR)/armv7-unknown-linux-musleabihf/release/cpu-all),arm/v7=$(TARGET_DIR)/armv7-unknown-linux-musleabihf/release/cpu-all) \
	$(if $(wildcard $(TARGET_DIR)/riscv64gc-unknown-linux-musl/release/cpu-all),riscv64=$(TARGET_DIR)/riscv64gc-unknown-linux-musl/release/cpu-all)
oci: static ## cpud container image, no Docker needed: target/oci/cpu-all-oci.tar (podman load -i ...); OCI_TAG=latest
	@[ -f $(OCI_AMD64_BIN) ] || $(MAKE) --no-print-directory static ARCH=x86_64
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || echo 0) oci/mkoci \
		$(foreach a,$(OCI_ARCHES),--bin $(a)) \
		$(foreach a,amd64 arm64 arm/v7,$(if $(OCI_BUSYBOX_$(subst /,,$(a))),--busybox $(a)=$(OCI_BUSYBOX_$(subst /,,$(a))))) \
		--tag $(OCI_TAG) --version "$$(git describe --always --dirty 2>/dev/null)" \
		-o $(OCI_DIR)/layout --archive $(OCI_DIR)/cpu-all-oci.tar --size-report $(OCI_DIR)/size.txt
