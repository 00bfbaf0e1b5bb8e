"""``outpost``: the command-line client for the /v1 API that every node (edge or core) serves.

One client serves the whole fleet because the API is the same everywhere: point ``--url`` at an
edge to steer that site alone, or at the core to steer the fleet. It uses only the standard
library so it installs anywhere an operator has Python, and streams (``logs -f``, ``events``)
are read line by line so output appears as the node writes it.

    outpost [--url URL] [--token T] [--json] tasks run NAME [options] -- CMD [ARGS...]
            (placement at the core: --site S, --label-constraint K=V, --spread | --binpack)
    outpost tasks ls [--state S] [--label K=V] [--name N] [--limit N] [--all]
    outpost tasks get|kill ID        outpost tasks logs ID [-f] [--tail N] [--stderr]
    outpost services ls | get NAME | rm NAME | scale NAME N | rollout status NAME
    outpost services run NAME --instances N [options] -- CMD [ARGS...]
    outpost services update NAME [--env K=V ...] [-- CMD [ARGS...]]
    outpost agents ls | agents revoke ID | offers ls | info | events [--after N]
    (an https:// node signed by a private CA: --cacert CA.pem or OUTPOST_CACERT)

Exit status: 0 ok, 1 the API refused (the line on stderr says why), 2 usage error, 3 the node
could not be reached (or a stream was cut), 130 interrupted by Ctrl-C.

The modules: ``api`` (the client, its error kinds, server-sent events), ``output`` (tables
and times), ``tasks``, ``services`` and ``fleet`` (agents, offers, info, events) for the
commands, ``main`` for the arguments and the entry point.
"""

from federation.cli.main import main

__all__ = ["main"]
