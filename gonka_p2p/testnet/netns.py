"""The testnet's network: Linux namespaces on a private bridge, and the faults put on its links.

Every name starts with :data:`PREFIX` and the harness's process id (so two
harnesses on one machine never touch each other's). One hub namespace holds the bridge;
each host (a participant, the load client, the observer) is a namespace with
one veth pair to the hub, created directly between the two namespaces, so the
root namespace and the host's real interfaces never see a link, an address or
a rule of ours: all traffic stays on 10.77.0.0/24 inside namespaces we made.
Deleting the namespaces deletes their links, queues and nftables tables with
them, which is all :func:`cleanup` has to do -- after first killing whatever
still runs inside them (``ip netns pids``). It removes this harness's
namespaces and those of every harness no longer alive, so one that crashed
leaves nothing behind that the next start does not remove.

A host behind a NAT (:func:`create_natted_host`) sits on a private subnet
10.78.<n>.0/24 of its own, linked to a router namespace that is on the
bridge like any host: the router forwards and masquerades (nftables ``ip
gtnnat`` table) what leaves the private subnet, and drops every new
connection that comes in, so the NATed host can dial out and nobody can dial
it -- peers see the router's address on its packets, and must reach it
through a relay (:mod:`gonka_p2p.gossip.relay`).

Faults: a partition and a packet-drop share are nftables rules in the
targets' own namespaces (``inet gtn`` table: drop by peer address, or
``numgen random mod 1000 < share``); a bandwidth cap is a ``tbf`` queue on
both ends of the target's link (the kernel has no netem, so there is no
latency fault).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

PREFIX = "gtn"
RUN = f"{PREFIX}{os.getpid()}-"  # this harness's namespaces
HUB = f"{RUN}hub"
BRIDGE = "br0"
SUBNET = "10.77.0"
NAT_SUBNET = "10.78"  # + ".<n>": the private subnet behind the n-th router


class PrivilegeError(Exception):
    """The machine does not let us make namespaces (not root, or no ``ip``/``nft``); says which."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, *argv, check=check)


def require_privilege() -> None:
    """Raise :class:`PrivilegeError` naming what is missing, before anything is created."""
    if os.geteuid() != 0:
        raise PrivilegeError("the testnet needs root: it creates network namespaces, veth links and "
                             "nftables rules (run it as root, e.g. in CI or under sudo)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            raise PrivilegeError(f"the testnet needs the {tool!r} command (Debian package {package}; "
                                 "scripts/setup.sh installs it)")
    probe = f"{RUN}probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        raise PrivilegeError(f"this machine forbids network namespaces (ip netns add: {made.stderr.strip()})")
    _run("ip", "netns", "del", probe, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def leftovers() -> list[str]:
    """This harness's namespaces and those of harnesses that are gone."""
    listing = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line]
    ours = [ns for ns in listing if ns.startswith(PREFIX) and ns[len(PREFIX):].split("-")[0].isdigit()]
    return [ns for ns in ours if ns.startswith(RUN) or not _alive(int(ns[len(PREFIX):].split("-")[0]))]


def cleanup() -> list[str]:
    """Kill every process inside :func:`leftovers`, then delete them; the names removed."""
    names = leftovers()
    for ns in names:
        for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGCONT)  # a frozen process must be able to die
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for ns in names:
        _run("ip", "netns", "del", ns, check=False)
    return names


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address, and the hub end of its link to the bridge. A host
    behind a NAT has a private address; its link is its router's, and peers see the router's
    address (``seen_as``) on its packets."""

    ns: str
    ip: str
    hub_link: str
    seen_as: str = ""

    @property
    def public_ip(self) -> str:
        return self.seen_as or self.ip

    def exec_argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def create_hub() -> None:
    _run("ip", "netns", "add", HUB)
    in_ns(HUB, "ip", "link", "add", BRIDGE, "type", "bridge")
    in_ns(HUB, "ip", "link", "set", BRIDGE, "up")
    in_ns(HUB, "ip", "link", "set", "lo", "up")


def create_host(name: str, octet: int) -> Host:
    """A namespace ``RUN+name`` at 10.77.0.<octet>, linked to the hub's bridge."""
    host = Host(f"{RUN}{name}", f"{SUBNET}.{octet}", f"h{octet}")
    _run("ip", "netns", "add", host.ns)
    _run("ip", "link", "add", "eth0", "netns", host.ns, "type", "veth",
         "peer", "name", host.hub_link, "netns", HUB)
    in_ns(HUB, "ip", "link", "set", host.hub_link, "master", BRIDGE)
    in_ns(HUB, "ip", "link", "set", host.hub_link, "up")
    in_ns(host.ns, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
    in_ns(host.ns, "ip", "link", "set", "eth0", "up")
    in_ns(host.ns, "ip", "link", "set", "lo", "up")
    return host


def create_natted_host(name: str, octet: int, subnet: int) -> Host:
    """A namespace ``RUN+name`` at 10.78.<subnet>.2 behind a router ``RUN+name-nat`` that is on the
    bridge at 10.77.0.<octet>, masquerades what the host sends and lets no connection in."""
    router = create_host(f"{name}-nat", octet)
    private = f"{NAT_SUBNET}.{subnet}"
    host = Host(f"{RUN}{name}", f"{private}.2", router.hub_link, seen_as=router.ip)
    _run("ip", "netns", "add", host.ns)
    _run("ip", "link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", "lan0", "netns", router.ns)
    in_ns(router.ns, "ip", "addr", "add", f"{private}.1/24", "dev", "lan0")
    in_ns(router.ns, "ip", "link", "set", "lan0", "up")
    in_ns(router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _nft(router, f"""table ip gtnnat {{
  chain forward {{ type filter hook forward priority 0; policy drop;
    iifname "lan0" oifname "eth0" accept
    iifname "eth0" oifname "lan0" ct state established,related accept
  }}
  chain postrouting {{ type nat hook postrouting priority 100; policy accept;
    oifname "eth0" ip saddr {private}.0/24 masquerade
  }}
}}
""")
    in_ns(host.ns, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
    in_ns(host.ns, "ip", "link", "set", "eth0", "up")
    in_ns(host.ns, "ip", "link", "set", "lo", "up")
    in_ns(host.ns, "ip", "route", "add", "default", "via", f"{private}.1")
    return host


def _nft(host: Host, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True)


def _table(rules: list[str]) -> str:
    body = "\n".join(f"    {r}" for r in rules)
    return (f"table inet gtn {{\n  chain input {{ type filter hook input priority 0; policy accept;\n{body}\n  }}\n"
            f"  chain output {{ type filter hook output priority 0; policy accept;\n{body}\n  }}\n}}\n")


def isolate(host: Host, peers: list[Host]) -> None:
    """Drop every packet between ``host`` and ``peers`` (one side of a partition)."""
    addrs = ", ".join(p.public_ip for p in peers)  # the address their packets carry here
    _nft(host, _table([f"ip saddr {{ {addrs} }} drop", f"ip daddr {{ {addrs} }} drop"]))


def drop_share(host: Host, share: float) -> None:
    """Drop ``share`` of the packets entering and leaving ``host``, each independently at random."""
    _nft(host, _table([f"numgen random mod 1000 < {round(share * 1000)} drop"]))


def clear_rules(host: Host) -> None:
    in_ns(host.ns, "nft", "delete", "table", "inet", "gtn", check=False)


def cap_bandwidth(host: Host, rate_kbit: int) -> None:
    """A token bucket on both ends of ``host``'s link: ``rate_kbit`` each way."""
    for ns, dev in ((host.ns, "eth0"), (HUB, host.hub_link)):
        in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit}kbit",
              "burst", "16kbit", "latency", "400ms")


def uncap_bandwidth(host: Host) -> None:
    for ns, dev in ((host.ns, "eth0"), (HUB, host.hub_link)):
        in_ns(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
