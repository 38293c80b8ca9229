#!/bin/bash
# Makes store-formatN.tar.gz and store-formatN.json: a store written by a
# renderfs of index format N, for tests/test_upgrade.py. Run as root with
# that build's renderfs (format 1: commit 0eab162; format 2: 56a31db;
# format 7: a1e2e6c):
#   RENDERFS=/path/to/old/build/tools/renderfs tests/data/make-store.sh N
# Jobs: complete (one named "owl", one served from the cache), error
# (the wan route has no backend), three queued of each priority, one
# cancelled, one deleted; from format 7 on, one queued on the wan route
# (remote: its queue group changes in format 8).
set -e
N=${1:?give the index format the renderfs writes}
B=${RENDERFS:?set RENDERFS to a renderfs of that format}
OUT=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d)
S=$W/store M=$W/mnt I=image/synth/default/t2i
mkdir "$M"
mnt() {
	"$B" -f -o "store=$S,$1" "$M" 2>>"$W/log" &
	echo $! >"$W/pid"
	for _ in $(seq 100); do mountpoint -q "$M" && return; sleep 0.05; done
	echo "renderfs did not mount" >&2; exit 1
}
um() { fusermount3 -u "$M"; wait "$(cat "$W/pid")"; }
submit() { # route, request lines...; prints the ids
	local r=$1; shift
	exec 3<>"$M/$r/new"; printf '%s\n' "$@" >&3
	for _ in "$@"; do read -r id <&3; echo "$id"; done
	exec 3>&-
}
wait_done() {
	for _ in $(seq 200); do
		case $(cat "$M/$1/status") in complete|error|cancelled) return;; esac
		sleep 0.05
	done
	echo "$1 did not finish" >&2; exit 1
}
mnt workers=1
A=$(submit $I '{"prompt":"red fox","width":64,"height":64,"seed":7}')
B2=$(submit $I '{"input":{"prompt":"blue owl","width":64,"height":64,"seed":8},"name":"owl"}')
D=$(submit $I '{"prompt":"to delete","width":64,"height":64,"seed":9}')
W2=$(submit video/wan/default/t2v '{"prompt":"a wan video"}')
for j in $A $B2 $D; do wait_done $I/$j; done
wait_done video/wan/default/t2v/$W2
C=$(submit $I '{"prompt":"red fox","width":64,"height":64,"seed":7}')
wait_done $I/$C
rm -r "$M/$I/$D"
um
mnt workers=0
submit $I '{"input":{"prompt":"q low","width":64,"height":64},"priority":"low"}' \
	'{"input":{"prompt":"q high","width":64,"height":64},"priority":"high"}' \
	'{"prompt":"q normal","width":64,"height":64}' \
	'{"prompt":"q cancel","width":64,"height":64}' >"$W/q"
echo cancel >"$M/$I/$(tail -1 "$W/q")/ctl"
if [ "$N" -ge 7 ]; then submit video/wan/default/t2v '{"prompt":"queued wan"}' >/dev/null; fi
# What the test expects to find: each job as it reads now.
/usr/bin/python3 - "$M" "$OUT/store-format$N.json" <<'PY'
import json, os, sys
m, out, jobs = sys.argv[1], sys.argv[2], {}
for route in ["image/synth/default/t2i", "video/wan/default/t2v"]:
    for e in sorted(os.listdir(f"{m}/{route}")):
        p = f"{m}/{route}/{e}"
        if not os.path.isdir(p) or os.path.islink(p):
            continue
        s = json.load(open(p + "/status.json"))
        s.pop("progress", None)
        s["log"] = open(p + "/log").read()
        s["request"] = json.load(open(p + "/request.json"))
        s["ino"] = os.stat(p).st_ino
        s["status_ino"] = os.stat(p + "/status").st_ino
        jobs[e] = s
json.dump(jobs, open(out, "w"), indent=1, sort_keys=True)
PY
um
rm -f "$S/lock"
tar czf "$OUT/store-format$N.tar.gz" -C "$W" store
rm -rf "$W"
