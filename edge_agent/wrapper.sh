# Outpost task wrapper (run by /bin/sh). Why it exists: a task must outlive the agent, and when
# the agent comes back it must still learn the task's real exit status. Only a parent can reap
# a process, so this tiny shell stays the task's parent and writes the status to a file.
#   sh wrapper.sh TASK_DIR NOFILE AS_KB [CGROUP_PROCS_FILE ...] -- COMMAND [ARGS ...]
dir=$1; nofile=$2; as_kb=$3; shift 3
echo $$ > "$dir/run.pid"
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  echo $$ > "$1" || { echo "outpost: cannot join cgroup $1" >&2; exit 125; }
  shift
done
shift
ulimit -n "$nofile" 2>/dev/null
[ "$as_kb" != "0" ] && ulimit -v "$as_kb"
ulimit -c 0
cd "$dir/sandbox" || exit 125
"$@" &
c=$!
trap 'kill -TERM $c 2>/dev/null' TERM
trap 'kill -INT $c 2>/dev/null' INT
trap 'kill -HUP $c 2>/dev/null' HUP
while kill -0 $c 2>/dev/null; do wait $c; done
wait $c
r=$?
# On a full disk the new file cannot take its bytes: then the status goes into exit.slot, made
# by the agent at spawn with room for it, overwritten in place (no new block needed).
{ echo $r > "$dir/exit.tmp" && mv -f "$dir/exit.tmp" "$dir/exit"; } 2>/dev/null ||
  { rm -f "$dir/exit.tmp"; printf '%-15s\n' "$r" 1<> "$dir/exit.slot"; }
exit $r
