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
INITRAMFS ?= $(TARGET_DIR)/cpu-all-initramfs$(if $(filter-out x86_64,$(ARCH)),-$(ARCH)).cpio.gz
PREFIX ?= /usr/local
SYSTEMD_UNIT_DIR_SET := $(SYSTEMD_UNIT_DIR)
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
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

.PHONY: all build static install size test unit lint fmt vmtest demo bench help initramfs setup setup-demo static-all oci

all: build

build: ## debug build of target/debug/cpu-all
	$(CARGO) build

static: ## fully static musl release binary for ARCH (x86_64 default, aarch64, armv7, riscv64)
	@tools/build-static $(ARCH) >/dev/null

static-all: ## static binaries for all four architectures
	@for a in $(ARCHES); do tools/build-static $$a >/dev/null || exit 1; done

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
	@$(MAKE) --no-print-directory -s oci >/dev/null && cat $(TARGET_DIR)/oci/size.txt

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

# tools/run-unit builds every test target of a plain `cargo test` (lib, bin, examples built,
# every tests/*.rs, the doc-tests), then runs the test binaries and the doc-tests UNIT_JOBS at a
# time (most of them wait on sockets, children and mDNS, not on the CPU): a progress line as
# each ends, then each one's output whole in cargo's order, each part's time, and the failures.
# UNIT_WIDE: the binaries that only wait (mDNS in network namespaces) run 4 tests at a time.
UNIT_JOBS ?= 8
UNIT_WIDE ?= discovery_netns discovery_peers
unit: ## every cargo test (unit, in-process and black-box), several binaries at a time; ends with the skips and why
	$(skip_reset)
	@CARGO=$(CARGO) UNIT_JOBS=$(UNIT_JOBS) UNIT_WIDE="$(UNIT_WIDE)" tools/run-unit
	$(skip_summary)

# The stages one after the other, each timed; the skips of all of them are summed up at the
# end, also when a stage failed. After setup, the builds vmtest needs (tests/vm/prebuild: the
# shipped x86_64 binary at lint's and unit's priority, since every VM group waits for it; then,
# niced, transport_echo and the board binaries) start in the background beside lint and unit;
# vmtest then finds them built or waits on cargo's lock for the rest. So lint's and unit's
# times include that company, and the builds' own times are printed at the end.
# VMTEST_PREBUILD=0: no builds beside, as before.
# A make started with SIGINT ignored (a background job of a script) passes that on to every
# test; cpud gives its commands default signals and the SIGINT tests restore SIGINT for what
# they signal, but other programs a test starts keep it ignored: it warns first. The builds
# run in a session of their own (setsid): stopped as a group when a stage fails or on Ctrl-C.
VMTEST_PREBUILD ?= 1
test: ## the full test suite (what CI runs): setup, lint, unit, vmtest
	@mkdir -p $(dir $(SKIP_LOG)) && rm -f $(SKIP_LOG); rc=0; times=""; pre=""; prepid=""; \
	trap '[ -z "$$prepid" ] || kill -TERM -- -$$prepid 2>/dev/null; rm -f "$$pre"; exit 130' INT TERM; \
	if [ $$(( 0x$$(awk '/^SigIgn:/ {print $$2}' /proc/self/status 2>/dev/null || echo 0) & 2 )) != 0 ]; then \
		echo "make test: warning: SIGINT is ignored here (started in the background by a script?);" \
			"the programs the tests start inherit that: run make test in the foreground"; \
	fi; \
	for stage in setup lint unit vmtest; do \
		if [ $$stage = lint ] && [ "$(VMTEST_PREBUILD)" != 0 ]; then \
			pre=$$(mktemp /tmp/cpu-make-test-prebuild.XXXXXX); \
			VMTEST_PROFILE=$(VMTEST_PROFILE) VMTEST_ARCHES="$(VMTEST_ARCHES)" CARGO=$(CARGO) \
				setsid tests/vm/prebuild >$$pre 2>&1 </dev/null & prepid=$$!; \
			echo "make test: the VM tests' builds start beside lint and unit (tests/vm/prebuild)"; \
		fi; \
		if [ $$stage = vmtest ] && [ -n "$$prepid" ]; then \
			echo "make test: builds done before vmtest: $$(grep -c '^prebuild' $$pre) ($$(grep '^prebuild' $$pre | cut -d' ' -f2 | tr -d : | tr '\n' ' ')); vmtest waits for the rest"; \
		fi; \
		start=$$(date +%s); \
		if ! $(MAKE) --no-print-directory SKIP_FRESH=0 $$stage; then rc=1; times="$$times $$stage:FAILED"; break; fi; \
		times="$$times $$stage:$$(( $$(date +%s) - start ))s"; \
	done; \
	if [ -n "$$prepid" ]; then \
		if [ $$rc != 0 ]; then kill -TERM -- -$$prepid 2>/dev/null; fi; \
		wait $$prepid; echo "vm builds beside lint and unit (tests/vm/prebuild):"; sed 's/^/  /' $$pre; rm -f $$pre; \
	fi; \
	echo "make test stages:$$times"; tools/skip-summary $(SKIP_LOG); \
	if [ $$rc = 0 ]; then echo "make test: PASS"; else echo "make test: FAIL"; fi; exit $$rc

# The VM tests boot the shipped x86_64 binary (make static's, built first). The board binaries
# only they run (the arm64 guest's cpud, the armv7 and riscv64 cpud under qemu-user) come from
# Cargo.toml's vmtest profile: the release code without fat LTO. tests/vm/all builds them and
# the vsock group's transport_echo in the background, one after the other (VMTEST_BUILD_BESIDE;
# each a no-op when up to date), from the start: beside the static binary's fat-LTO link
# (mostly one core), then beside the x86 groups; a group that needs one of them starts when it
# is built. VMTEST_GROUPS_ALL="e2e arm64" runs some groups (tests/vm/all lists them; only the
# builds they need are made); VMTEST_JOBS=1 runs them one after the other.
VMTEST_PROFILE ?= vmtest
VMTEST_ARCHES ?= aarch64 armv7 riscv64
vmtest: ## system tests in qemu VMs, two groups at a time (each skips with a reason when qemu is missing)
	$(skip_reset)
	VMTEST_PROFILE=$(VMTEST_PROFILE) VMTEST_BUILD_BESIDE="$(VMTEST_ARCHES) transport_echo" CARGO=$(CARGO) \
	VMTEST_BUILD_FIRST='tools/build-static $(ARCH) >/dev/null' tests/vm/all $(STATIC_BIN) $(VMTEST_GROUPS_ALL)
	$(skip_summary)

demo: setup-demo static ## boot a VM running cpud and run cpu against it
	@if [ -x vm/demo ]; then vm/demo $(STATIC_BIN); else echo "demo: not available yet"; exit 1; fi

bench: static ## figures for speed and size, compared with bench/baseline.txt
	bench/run $(STATIC_BIN)

initramfs: static ## initramfs with cpud as /init: make initramfs [ARCH=aarch64] KEY=key.pub [EXTRA="src:/dst ..."] [MODDIR=/lib/modules/V MODULES="9p virtio_net"] [FLAGS="-d -poweroff"] [INITRAMFS=out]
	@[ -n "$(KEY)" ] || { echo "usage: make initramfs KEY=path/to/key.pub [EXTRA=src:/dst ...] [MODDIR=... MODULES=...] [FLAGS=...]"; exit 2; }
	vm/mkinitramfs -b $(STATIC_BIN) -k "$(KEY)" -o "$(INITRAMFS)" $(if $(STATE),-s "$(STATE)") \
		$(foreach e,$(EXTRA),-e "$(e)") $(if $(MODDIR),-M "$(MODDIR)") $(foreach m,$(MODULES),-m "$(m)") \
		$(foreach f,$(FLAGS),-f "$(f)")

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

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
