"""The gossipsub router: py-libp2p 0.8.1's GossipSub with its defaults and its PRUNE handling corrected.

Part of the corrections of :mod:`~gonka_p2p.gossip.libp2p_patches` (same rules: each
definition names the upstream behaviour it corrects and why it hurts this network),
kept apart because the router is a unit of its own: what it is built with
(:func:`gossip_router`) and what it does differently (:class:`GossipRouter`).

Its memory per peer: at most ``PENDING_PER_PEER`` messages held for a peer whose
subscriptions have not arrived, and one backoff entry per (topic we are meshed in,
peer that pruned us), each gone at most ``MAX_PRUNE_BACKOFF_S`` later; in all, a
digest (not the message) of each of the last 500-1,000 messages forwarded.
"""

from __future__ import annotations

import hashlib
import time
from typing import DefaultDict

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.score import ScoreParams

HEARTBEAT_INTERVAL = 1  # seconds; py-libp2p's default of 120 lets caches balloon
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 6, 4, 12
# Gossip held for a peer until its subscriptions arrive (py-libp2p: 100 RPCs for 30 s, then a WARNING per message)
PENDING_PER_PEER = 16
PENDING_TTL_S = 5.0
MAX_PRUNE_BACKOFF_S = 600  # the longest a PRUNE may keep us from grafting its sender again (spec default: 60)


def gossip_router() -> GossipSub:
    """GossipSub with its lossy or inverted defaults replaced.

    * ``heartbeat_interval`` defaults to 120 s, so the message cache and mesh
      repair lag by minutes and caches grow to hundreds of MB: 1 s.
    * ``adaptive_gossip_enabled`` (default on) rewrites ``heartbeat_interval``
      to at least 60 s whenever its "network health" dips and changes mesh
      degrees at runtime: disabled.
    * Spam protection (default on) rate-limits each *forwarder* to 10
      messages per second per topic; the excess is delivered locally but
      silently not forwarded, and the honest relay is penalised. Disabled:
      topic validators and delivery backpressure are our flood defence.
    * gossipsub v1.2+ sends an IDONTWANT control RPC to every mesh peer for
      every message, whatever its size (the spec meant it for large
      messages), and every RPC carries a signed peer record that the receiver
      verifies. Our gossip messages are small (payloads travel over streams),
      so we speak ``/meshsub/1.1.0`` only: half the RPCs, about twice the
      burst throughput.
    * Peer scoring: py-libp2p *subtracts* the P4 (invalid messages), P5
      (behaviour) and P7 (IP colocation) terms, so its weights for them must
      be positive where the gossipsub spec's are negative; copying spec
      weights would reward misbehaviour. We keep all weights at zero and all
      thresholds at -inf (``ScoreParams()``), so scoring can never graylist or
      prune an honest peer (all our test peers share one IP, which P7 would
      punish); topic validators do the filtering instead. (So PX is not
      gated by ``accept_px_threshold`` either: :class:`GossipRouter` drops it.)
    """
    return GossipRouter(
        protocols=[PROTOCOL_ID_V11],
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        score_params=ScoreParams(),
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
        max_pending_messages_per_peer=PENDING_PER_PEER,
        pending_messages_ttl=PENDING_TTL_S,
    )


class GossipRouter(GossipSub):
    """GossipSub that holds little for peers and believes little of a PRUNE.

    * Gossip for a peer whose subscriptions have not arrived: py-libp2p 0.8.1
      queues each message for every gossip peer not (yet) subscribed to its
      topic, to cover the moment between a connection and its subscriptions.
      A client speaks gossip but subscribes to nothing, so it never leaves
      that moment: 100 messages were held for it, and each one past those
      logged a WARNING -- 99 % of every participant's log in testnet run 10,
      and one line per message per connected identity for whoever opens many.
      The race needs a few seconds: ``PENDING_PER_PEER`` messages for
      ``PENDING_TTL_S``, trimmed without a log line (gossip's IHAVE / IWANT
      repair covers a subscriber slower than that).
    * Peer exchange: a PRUNE may carry up to 16 signed peer records, and
      upstream's ``handle_prune`` dials every one of them -- whatever ``do_px``
      says (that flag governs only what *we* send) and with no score gate
      (``accept_px_threshold`` is -inf). Any connected peer could aim our dials
      at a victim's address (a reflector) or fill our connections with its
      own sybils (an eclipse), past the directory's rules on whom to dial, and
      fill the peerstore with 2-hour entries. The records are dropped unread:
      which peers to dial is the directory's decision alone.
    * Backoff: upstream files a backoff entry under every topic a PRUNE
      names, for as long as the PRUNE asks, and removes an expired entry
      only when that very (peer, topic) is checked again -- a topic's table
      never. A PRUNE for a topic we have no mesh for means nothing (we never
      grafted its sender there) and is ignored; a backoff is clamped to
      ``MAX_PRUNE_BACKOFF_S``, and expired entries are swept every heartbeat.
    * Equivocation check: upstream keeps every message it forwards, whole, under
      its (sender, seqno) to compare a later one with the same id -- up to 1,000
      of them (trimmed to 500 at a heartbeat). A funded key can sign batch after
      batch of transactions that each pass the topic's validator against the
      committed state (one account, one sequence, many amounts): 1 MB messages,
      a gigabyte held on every node. Here the entry is a digest of what the
      comparison reads (the data and the topics).
    """

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        key = msg.from_id + msg.seqno
        content = _content_digest(msg)
        first = self.equivocation_detection.setdefault(key, content)  # type: ignore[arg-type]
        return first == content  # (upstream also penalises the sender's score, which we keep at zero)

    def _prune_pending_messages(self, peer_id: ID) -> None:
        queue = self._pending_messages.get(peer_id)
        if queue is None:
            return
        oldest = time.time() - self._pending_messages_ttl
        room = max(0, len(queue) - self._max_pending_messages_per_peer + 1)  # for the message queued next
        queue[:] = [entry for entry in queue[room:] if entry[0] >= oldest]
        if not queue:
            del self._pending_messages[peer_id]

    async def handle_prune(self, prune_msg: rpc_pb2.ControlPrune, sender_peer_id: ID) -> None:
        if prune_msg.topicID not in self.mesh:
            return
        kept = rpc_pb2.ControlPrune(topicID=prune_msg.topicID, backoff=min(prune_msg.backoff, MAX_PRUNE_BACKOFF_S))
        await super().handle_prune(kept, sender_peer_id)

    def mesh_heartbeat(self) -> tuple[DefaultDict[ID, list[str]], DefaultDict[ID, list[str]]]:
        self._sweep_back_off()
        return super().mesh_heartbeat()

    def _sweep_back_off(self) -> None:
        """Forget backoffs that have run out (upstream's own test: in force while ``till > now``)."""
        now = int(time.time())
        for topic, peers in list(self.back_off.items()):
            for peer in [p for p, till in peers.items() if till <= now]:
                del peers[peer]
            if not peers:
                del self.back_off[topic]


def _content_digest(msg: rpc_pb2.Message) -> bytes:
    """SHA-256 over a message's data and topics, each length-prefixed (one encoding per content)."""
    h = hashlib.sha256()
    for part in (msg.data, *(t.encode() for t in msg.topicIDs)):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()
