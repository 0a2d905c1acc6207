"""The OpenAI binding: existing OpenAI-SDK code talks to the network through a TA.

Three modules, each on its own side of the HTTP connection:

* ``auth`` (client side) -- maps an OpenAI body to the signed
  ``InferenceRequest`` it stands for, and :class:`~gonka_p2p.openai.auth.GonkaAuth`,
  the ``httpx`` hook that signs each request with the client's ledger key.
* ``format`` (either side) -- the verified stream's events in OpenAI's JSON
  and SSE shapes; pure functions, no I/O.
* ``gateway`` (server side) -- the HTTP server a node runs with ``--http``,
  in front of its transfer agent. It uses the actors as the CLI does.

``auth`` and ``format`` import no actor, so a client that only signs never
loads the node; nothing in ``wire/``, ``gossip/``, ``inference/`` or
``ledger/`` imports this package.
"""
