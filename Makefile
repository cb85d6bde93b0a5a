# sanblk: `make test` builds everything (installing what is missing) and runs every test;
# `make demo` boots a guest with the module. See README.md.

# Build the module against your own Rust-enabled kernel tree with `make kmod KDIR=/path`.
KDIR ?=
KBUILD_FLAGS ?= LLVM=1
CARGO ?= cargo

.PHONY: all deps kernel kmod build test unit-test qemu-test lint demo bench clean

all: kmod build

deps:
	@qemu/install-deps.sh

kernel: deps
	@qemu/build-kernel.sh >/dev/null

kmod/generated/sanblk_uapi.h: uapi/src/netlink.rs uapi/examples/c_header.rs
	@mkdir -p kmod/generated
	$(CARGO) run -q -p sanblk-uapi --example c_header > $@.tmp && mv $@.tmp $@

# Without KDIR, the project's cached kernel is used (and built on first use).
kmod: kmod/generated/sanblk_uapi.h
	@kdir="$(KDIR)"; [ -n "$$kdir" ] || kdir=$$(qemu/build-kernel.sh); \
	$(MAKE) -C "$$kdir" M=$(CURDIR)/kmod $(KBUILD_FLAGS) modules

build:
	$(CARGO) build --workspace --all-targets

# The module is linted against its kernel tree (built on first use, as for `make kmod`): rustfmt
# with the tree's .rustfmt.toml, and clippy through the kernel build (CLIPPY=1) on a copy of
# kmod/ in target/kmod-lint (beside a link to uapi/, which it includes), so the objects of
# `make kmod` stay as they are and clippy sees every file.
lint: kmod/generated/sanblk_uapi.h
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@kdir="$(KDIR)"; [ -n "$$kdir" ] || kdir=$$(qemu/build-kernel.sh); \
	echo "rustfmt --check kmod (config $$kdir/.rustfmt.toml)"; \
	rustfmt --check --edition 2021 --config-path "$$kdir/.rustfmt.toml" kmod/sanblk_main.rs && \
	rm -rf target/kmod-lint && mkdir -p target/kmod-lint && cp -r kmod target/kmod-lint/kmod && \
	ln -s ../../uapi target/kmod-lint/uapi && \
	echo "clippy kmod (make CLIPPY=1)" && \
	$(MAKE) -s -C "$$kdir" M=$(CURDIR)/target/kmod-lint/kmod $(KBUILD_FLAGS) clean && \
	$(MAKE) -s -C "$$kdir" M=$(CURDIR)/target/kmod-lint/kmod $(KBUILD_FLAGS) CLIPPY=1 KRUSTFLAGS=-Dwarnings modules

unit-test:
	$(CARGO) test --workspace --lib --bins

# QEMU tests boot the kernel that `make kernel` built (or SANBLK_KERNEL_TREE=KDIR). Every
# test of the workspace runs on one cargo-nextest queue (.config/nextest.toml: two at a time,
# the longest first); nextest does not run doc tests, cargo test does.
test: deps kernel kmod build lint
	$(CARGO) test -q --workspace --doc
	SANBLK_KERNEL_TREE=$(KDIR) $(CARGO) nextest run --workspace

demo: deps kernel kmod build
	$(CARGO) run -q -p sanblk-tests --bin sanblk-demo

# Benchmarks print markdown tables; BENCHMARKS.md records them with their commands. The data
# path is measured on the non-debug "bench" kernel flavour, with the module built for it in
# target/bench (a copy of kmod/ beside a link to uapi/, which the module includes), as is the
# failure-path bench (fault stall, redirected path vs nbd) and the change bench (I/O pause per
# change against dm suspend/resume) and the snapshot bench (copy-on-write against
# dm-snapshot, backup over NBD); then, on the host, backup throughput at 1 GiB and the
# changed-chunk list of a 2 TiB volume, the server control plane and
# rebuild-vs-copy benches run on the host.
bench: deps kernel kmod build
	@benchtree=$$(qemu/build-kernel.sh bench); \
	rm -rf target/bench && mkdir -p target/bench && cp -r kmod target/bench/kmod && ln -s ../../uapi target/bench/uapi && \
	$(MAKE) -s -C "$$benchtree" M=$(CURDIR)/target/bench/kmod $(KBUILD_FLAGS) clean modules >/dev/null && \
	SANBLK_BENCH_KERNEL=$$benchtree/arch/x86/boot/bzImage SANBLK_BENCH_MODULE=$(CURDIR)/target/bench/kmod/sanblk.ko \
	$(CARGO) run -q -p sanblk-tests --bin sanblk-bench-datapath && \
	SANBLK_BENCH_KERNEL=$$benchtree/arch/x86/boot/bzImage SANBLK_BENCH_MODULE=$(CURDIR)/target/bench/kmod/sanblk.ko \
	$(CARGO) run -q -p sanblk-tests --bin sanblk-bench-failure && \
	SANBLK_BENCH_KERNEL=$$benchtree/arch/x86/boot/bzImage SANBLK_BENCH_MODULE=$(CURDIR)/target/bench/kmod/sanblk.ko \
	$(CARGO) run -q -p sanblk-tests --bin sanblk-bench-change && \
	SANBLK_BENCH_KERNEL=$$benchtree/arch/x86/boot/bzImage SANBLK_BENCH_MODULE=$(CURDIR)/target/bench/kmod/sanblk.ko \
	$(CARGO) run -q -p sanblk-tests --bin sanblk-bench-snapshot
	$(CARGO) build -q --release -p sand -p sanctl && \
	SANBLK_HOST_BIN_DIR=$(CURDIR)/target/release $(CARGO) run -q -p sanblk-tests --bin sanblk-bench-backup
	$(CARGO) run -q --release -p sand --bin sand-bench -- --clients 10000
	$(CARGO) run -q --release -p sand --bin sand-bench -- --attack --hostile 4000
	$(CARGO) build -q --release -p sand --bins && target/release/sand-iobench --rebuild --size-mib 1024 --rounds 5 --dir target
	target/release/sand-iobench --rebuild --move --size-mib 512 --rounds 5 --dir target

clean:
	$(CARGO) clean
	rm -rf kmod/generated
	@kdir="$(KDIR)"; [ -n "$$kdir" ] || kdir=$$(qemu/build-kernel.sh 2>/dev/null) || true; \
	[ -z "$$kdir" ] || $(MAKE) -C "$$kdir" M=$(CURDIR)/kmod $(KBUILD_FLAGS) clean
