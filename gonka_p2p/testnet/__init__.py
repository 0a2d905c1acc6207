"""A testnet that lives: participants in their own network namespaces, client load, faults, invariants.

``gonka-p2p testnet run MANIFEST`` (see :mod:`gonka_p2p.testnet.manifest`
for the file). The pieces: :mod:`netns` (namespaces, bridge, nftables and
tbf faults, cleanup), :mod:`runner` (processes and the perturbation
schedule), :mod:`load` and :mod:`observer` (helper processes inside their
own namespaces, speaking the client protocol), :mod:`invariants` (the
verdict) and :mod:`report`. It lives in the package, not under
``benchmarks/``, because it is a command people run against the code they
ship (like ``demo``), and its manifests are data beside it in ``testnet/``.
"""
