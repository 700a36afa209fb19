#!/usr/bin/env bash
# Debian packages of quota_ext, one per PostgreSQL major version:
#   ./scripts/package.sh [MAJOR...]     (default: every supported version)
# writes target/debian/postgresql-<MAJOR>-quota-ext_<version>_amd64.deb, built with dpkg-deb from
# what `cargo pgrx package` lays out, with the files moved to Debian's paths
# (/usr/lib/postgresql/<MAJOR>/lib, /usr/share/postgresql/<MAJOR>/extension) and a dependency on
# that version's server package (postgresql-<MAJOR>, from Debian or apt.postgresql.org).
. "$(dirname "$0")/lib.sh"

ensure_all
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)
OUT="$REPO/target/debian"
mkdir -p "$OUT"

package_one() {
    use_pg "$1"
    log "cargo pgrx package for PostgreSQL $PG_MAJOR"
    (cd "$REPO" && cargo pgrx package --pg-config "$PG_CONFIG" --features "$PG_FEATURE" --no-default-features)
    local laid="$REPO/target/release/quota_ext-$PG_FEATURE" root="$OUT/root-$PG_MAJOR"
    local lib share
    lib="$laid$("$PG_CONFIG" --pkglibdir)"
    share="$laid$("$PG_CONFIG" --sharedir)/extension"
    rm -rf "$root"
    install -d "$root/DEBIAN" "$root/usr/lib/postgresql/$PG_MAJOR/lib" \
        "$root/usr/share/postgresql/$PG_MAJOR/extension" "$root/usr/share/doc/postgresql-$PG_MAJOR-quota-ext"
    install -m 644 "$lib/quota_ext.so" "$root/usr/lib/postgresql/$PG_MAJOR/lib/"
    install -m 644 "$share"/quota_ext* "$root/usr/share/postgresql/$PG_MAJOR/extension/"
    printf 'quota_ext %s\nLicense: Apache-2.0 (see Cargo.toml)\n' "$VERSION" \
        > "$root/usr/share/doc/postgresql-$PG_MAJOR-quota-ext/copyright"
    cat > "$root/DEBIAN/control" <<CONTROL
Package: postgresql-$PG_MAJOR-quota-ext
Version: $VERSION-1
Architecture: amd64
Maintainer: quota_ext maintainers <quota-ext@localhost>
Depends: postgresql-$PG_MAJOR, libc6 (>= 2.34)
Section: database
Priority: optional
Installed-Size: $(du -sk "$root/usr" | cut -f1)
Description: exact quotas, rate limits and inventory batches inside PostgreSQL $PG_MAJOR
 quota_ext: check-and-increment quotas per subject, metric and calendar period, GCRA rate
 limits in shared memory with a PostgREST pre-request hook, inventory batches and an audit
 trail. Needs shared_preload_libraries = 'quota_ext'.
CONTROL
    local deb="$OUT/postgresql-$PG_MAJOR-quota-ext_${VERSION}-1_amd64.deb"
    dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
    rm -rf "$root"
    log "wrote $deb"
}

for major in "${@:-${PG_VERSIONS[@]}}"; do
    package_one "$major"
done
