#!/usr/bin/env bash
# Packaging test (run by .ci/run, as root): builds the .deb and the .rpm and
# checks them (lintian, rpm listing and scripts, rpmlint, mandoc,
# systemd-analyze verify and security), then installs the .deb under a real
# systemd in a systemd-nspawn container and operates the service the way an
# administrator would, then does the same with the container image (podman).
# Installs what it needs when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# ------------------------------------------------------------------ tools
need=()
for t in systemd-nspawn:systemd-container debootstrap:debootstrap lintian:lintian rpm:rpm \
         rpmlint:rpmlint mandoc:mandoc systemd-analyze:systemd nsenter:util-linux \
         podman:podman runc:runc podman-compose:podman-compose curl:curl; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ------------------------------------------------------------------ build
say "building packages (packaging/build.sh, the README's command)"
built=$(bash packaging/build.sh)
deb=$(sed -n 1p <<<"$built")
rpmf=$(sed -n 2p <<<"$built")
echo "$deb"; echo "$rpmf"
[ -f "$deb" ] && [ -f "$rpmf" ] || fail "packaging/build.sh did not build both packages"

say "lintian"
# Its exit status decides: 0 only when it checked the package and found no
# error or warning; anything else (tags at those levels, or a lintian that
# could not run: an unknown option or tag exits 25 without checking) fails.
rc=0
out=$(lintian --fail-on error,warning --display-info "$deb" 2>&1) || rc=$?
grep -v '^running with root' <<<"$out" || true
[ "$rc" -eq 0 ] || fail "lintian exited $rc: errors or warnings, or it did not check the package"
echo "lintian: no errors or warnings"

say "rpm contents and scripts"
files=$(rpm -qpl "$rpmf"); echo "$files"
for f in /usr/bin/ralph-qchat /usr/lib/systemd/system/ralph-qchat.service /etc/ralph-qchat/qchat.toml \
         /usr/share/man/man8/ralph-qchat.8.gz /usr/share/man/man5/ralph-qchat.toml.5.gz; do
  grep -qx "$f" <<<"$files" || fail "rpm lacks $f"
done
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpmf" | grep '^cn /etc/ralph-qchat/qchat.toml$' >/dev/null \
  || fail "qchat.toml is not %config(noreplace)"
scripts=$(rpm -qp --scripts "$rpmf")
for s in useradd "systemctl preset" "disable --now" "try-restart"; do
  grep -q -- "$s" <<<"$scripts" || fail "rpm scriptlets lack $s"
done
echo "scriptlets: user creation, preset, disable on removal, restart on upgrade"

say "rpmlint (errors the generator cannot fix are listed in the README)"
lint=$(rpmlint "$rpmf" 2>&1 || true)
grep -E '^ralph-qchat' <<<"$lint" || true
unexpected=$(grep -E ': E: ' <<<"$lint" | grep -vE 'E: (no-signature|no-packager-tag|no-group-tag|no-changelogname-tag|no-buildhost-tag)$' || true)
[ -z "$unexpected" ] || fail "rpmlint errors: $unexpected"

say "mandoc -T lint"
mandoc -T lint -W warning man/ralph-qchat.8 man/ralph-qchat.toml.5 && echo clean

say "systemd-analyze verify and security"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/man/man8" "$work/man/man5"
cp man/ralph-qchat.8 "$work/man/man8/"; cp man/ralph-qchat.toml.5 "$work/man/man5/"
sed "s|/usr/bin/ralph-qchat|$PWD/target/release/ralph-qchat|" systemd/ralph-qchat.service > "$work/ralph-qchat.service"
MANPATH="$work/man" systemd-analyze verify "$work/ralph-qchat.service" 2>&1 | tee "$work/verify.log"
[ -s "$work/verify.log" ] && fail "systemd-analyze verify is not clean"
score=$(systemd-analyze security --offline=true systemd/ralph-qchat.service 2>/dev/null \
        | sed -n 's/.*Overall exposure level for ralph-qchat.service: \([0-9.]*\).*/\1/p')
echo "exposure $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' || fail "exposure $score is above 1.5"

# ------------------------------------------------------------------ systemd
# Twice: as the container boots by default on these hosts (a legacy cgroup
# layout inside, where the unit's cgroup is not writable: subreaper mode),
# and on a pure cgroup v2 hierarchy as on a Debian 12 server (cgroup mode
# under Delegate=yes).
say "the .deb under a real systemd, legacy cgroup layout (subreaper mode)"
UNIFIED=0 bash packaging/systemd-test.sh "$deb"
say "the .deb under a real systemd, pure cgroup v2 (cgroup mode)"
UNIFIED=1 bash packaging/systemd-test.sh "$deb"

# ------------------------------------------------------------------ container
# packaging/Dockerfile built with podman on the base system above (no image
# registry is reachable here), and the container operated.
say "the container image under podman"
bash packaging/container-test.sh
