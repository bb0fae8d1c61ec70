#!/usr/bin/env bash
# Fetches a stock Debian cloud kernel and builds a busybox initramfs for
# memvisor's Linux boot tests. Idempotent: everything is cached under
# $MEMVISOR_LINUX_CACHE (default: target/linux/ in the workspace, which
# git ignores with the rest of target/); a second run only prints paths.
#
# Produces, and prints as KEY=PATH lines on stdout:
#   VMLINUZ    the bzImage from linux-image-<abi>-cloud-amd64
#   VMLINUX    the uncompressed ELF kernel carried inside that bzImage; it
#              has a Xen PVH entry note (CONFIG_PVH), so memvisor boots it
#              the PVH way
#   VMLINUX_NOPVH  the same with that note's type changed (18 -> 0x7fff), so
#              memvisor boots it as a plain vmlinux through Linux's 64-bit
#              boot protocol with a zero page: the path of kernels built
#              without CONFIG_PVH
#   INITRAMFS  an uncompressed cpio (newc) archive: busybox-static and an
#              /init that mounts proc and sys, prints the marker below and
#              reboots (reboot(2) RESTART: the VMM sees the i8042 reset or a
#              triple fault, depending on the reboot= method)
#   VERSION    the kernel package's version string, for reports
#
# Environment:
#   MEMVISOR_LINUX_CACHE    where to cache (default: <repo>/target/linux)
#   MEMVISOR_LINUX_PACKAGE  a versioned image package to use instead of the
#                           one linux-image-cloud-amd64 depends on today
#
# Kernel binaries are never committed: this script is how tests get one.
set -euo pipefail

# The line /init prints once user space runs; tests look for it.
readonly INIT_MARKER="MEMVISOR-INIT-OK"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${MEMVISOR_LINUX_CACHE:-$repo/target/linux}"
mkdir -p "$cache"

log() { echo "fetch.sh: $*" >&2; }
die() { echo "fetch.sh: error: $*" >&2; exit 1; }

apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

# Installs the Debian packages whose commands are missing ("cmd:package").
need() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_update_once
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

need dpkg-deb:dpkg od:coreutils dd:coreutils

# --- the kernel package --------------------------------------------------

# linux-image-cloud-amd64 is a metapackage: its only dependency is the
# versioned image package (linux-image-<abi>-cloud-amd64) that has the files.
resolve_package() {
    local dep
    dep="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)"
    if [[ -z $dep ]]; then
        apt_update_once
        dep="$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)"
    fi
    [[ -n $dep ]] || die "cannot resolve the package linux-image-cloud-amd64 depends on"
    echo "$dep"
}

pkg="${MEMVISOR_LINUX_PACKAGE:-}"
if [[ -z $pkg && -f $cache/package ]]; then
    pkg="$(cat "$cache/package")"
fi
if [[ -z $pkg ]]; then
    pkg="$(resolve_package)"
fi
kdir="$cache/$pkg"
vmlinuz="$kdir/vmlinuz"
vmlinux="$kdir/vmlinux"
vmlinux_nopvh="$kdir/vmlinux-nopvh"

if [[ ! -s $vmlinuz ]]; then
    mkdir -p "$kdir/deb"
    log "downloading $pkg"
    (cd "$kdir/deb" && { apt-get download "$pkg" >&2 2>/dev/null || { apt_update_once; apt-get download "$pkg" >&2; }; })
    deb="$(ls "$kdir"/deb/*.deb | head -n1)"
    dpkg-deb --field "$deb" Version >"$kdir/version"
    rm -rf "$kdir/root"
    dpkg-deb -x "$deb" "$kdir/root"
    src="$(ls "$kdir"/root/boot/vmlinuz-* | head -n1)"
    [[ -s $src ]] || die "$deb has no /boot/vmlinuz-*"
    cp "$src" "$vmlinuz.tmp"
    mv "$vmlinuz.tmp" "$vmlinuz"
    # The modules are not needed (the initramfs loads none).
    rm -rf "$kdir/root" "$kdir/deb"
fi
echo "$pkg" >"$cache/package"

# --- vmlinux from the bzImage --------------------------------------------

# Reads an unsigned little-endian integer of $3 bytes at offset $2 of file $1.
le() { od -An -t "u$3" -j "$2" -N "$3" "$1" | tr -d ' '; }

extract_vmlinux() {
    local img="$1" out="$2"
    # Setup header (Documentation/arch/x86/boot.rst): "HdrS" at 0x202,
    # protocol version at 0x206, setup_sects at 0x1f1 (0 means 4); the
    # protected-mode code starts at (setup_sects + 1) * 512. From protocol
    # 2.08 payload_offset (0x248, relative to that start) and
    # payload_length (0x24c) locate the compressed kernel exactly, so no
    # scan for magic numbers is needed.
    [[ "$(dd if="$img" bs=1 skip=$((0x202)) count=4 status=none)" == HdrS ]] || die "$img is not a bzImage (no HdrS)"
    local version setup_sects pm_start off len
    version="$(le "$img" $((0x206)) 2)"
    ((version >= 0x208)) || die "$img has boot protocol $(printf '%#x' "$version"), payload fields need 2.08"
    setup_sects="$(le "$img" $((0x1f1)) 1)"
    ((setup_sects != 0)) || setup_sects=4
    pm_start=$(((setup_sects + 1) * 512))
    off=$((pm_start + $(le "$img" $((0x248)) 4)))
    len="$(le "$img" $((0x24c)) 4)"
    # The compressor, by the payload's magic bytes.
    local magic
    magic="$(od -An -t x1 -j "$off" -N 6 "$img" | tr -d ' \n')"
    local cmd
    case "$magic" in
        fd377a585a00*) need xz:xz-utils; cmd=(xz -dc --single-stream) ;;
        28b52ffd*) need zstd:zstd; cmd=(zstd -dc) ;;
        1f8b*) cmd=(gzip -dc) ;;
        425a68*) need bzip2:bzip2; cmd=(bzip2 -dc) ;;
        02214c18*) need lz4:lz4; cmd=(lz4 -dc) ;;
        5d0000*) need xz:xz-utils; cmd=(xz -dc --format=lzma) ;;
        *) die "unknown compression of the kernel payload (magic $magic at $off)" ;;
    esac
    log "decompressing the $len-byte payload at $off with ${cmd[0]}"
    # The payload ends with the 4-byte uncompressed size the kernel's build
    # appends (scripts/Makefile.lib, size_append): decompressors that do not
    # stop at the end of their stream complain about it; the output is
    # checked instead of their status.
    tail -c +"$((off + 1))" "$img" | head -c "$len" | "${cmd[@]}" >"$out.tmp" 2>/dev/null || true
    [[ "$(head -c 4 "$out.tmp" | od -An -t x1 | tr -d ' \n')" == 7f454c46 ]] || die "the decompressed payload of $img is not an ELF"
    local want
    want="$(le "$img" $((off + len - 4)) 4)"
    [[ "$(stat -c %s "$out.tmp")" == "$want" ]] || die "the decompressed payload has $(stat -c %s "$out.tmp") bytes, the bzImage says $want"
    mv "$out.tmp" "$out"
}

if [[ ! -s $vmlinux ]]; then
    extract_vmlinux "$vmlinuz" "$vmlinux"
fi

# The PVH entry note: namesz 4, descsz 4 or 8, type 18
# (XEN_ELFNOTE_PHYS32_ENTRY, Xen public/elfnote.h), name "Xen\0". Its type
# word is overwritten with 0x7fff, a type no loader knows.
if [[ ! -s $vmlinux_nopvh ]]; then
    hits="$(LC_ALL=C grep -obUaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$vmlinux" | cut -d: -f1)"
    [[ $(wc -w <<<"$hits") -eq 1 ]] || die "expected one PVH entry note in $vmlinux, found: ${hits:-none}"
    cp "$vmlinux" "$vmlinux_nopvh.tmp"
    printf '\xff\x7f\x00\x00' | dd of="$vmlinux_nopvh.tmp" bs=1 seek=$((hits + 8)) conv=notrunc status=none
    mv "$vmlinux_nopvh.tmp" "$vmlinux_nopvh"
fi

# --- the initramfs ---------------------------------------------------------

initramfs="$cache/initramfs.cpio"
if [[ ! -s $initramfs ]]; then
    need cpio:cpio
    # busybox-static's /bin/busybox: the initramfs has no libraries.
    if [[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != *"ok installed"* ]]; then
        apt_update_once
        log "installing busybox-static"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2
    fi
    stage="$cache/initramfs.stage"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,dev,proc,sys,sbin}
    cp /bin/busybox "$stage/bin/busybox"
    # The kernel opens /dev/console for init's stdio before /init runs; an
    # initramfs without it leaves init with no output.
    mknod "$stage/dev/console" c 5 1
    cat >"$stage/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "$INIT_MARKER \$(cat /proc/uptime)"
reboot -f
EOF
    chmod 755 "$stage/init"
    # Uncompressed: unpacking costs a copy, where gunzip at ring 0 would be
    # emulated instruction by instruction on KVM's PVM flavour.
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 >"$initramfs.tmp")
    mv "$initramfs.tmp" "$initramfs"
    rm -rf "$stage"
fi

echo "VMLINUZ=$vmlinuz"
echo "VMLINUX=$vmlinux"
echo "VMLINUX_NOPVH=$vmlinux_nopvh"
echo "INITRAMFS=$initramfs"
echo "VERSION=$(cat "$kdir/version" 2>/dev/null || echo unknown)"
