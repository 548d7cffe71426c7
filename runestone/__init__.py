"""Runestone: an OpenAI-compatible LLM gateway on Trio, shaped like an OTP application.

The package map, floor first. A package imports only packages on floors below its own (never one beside
or above it); ``tests/test_package_map.py`` holds this rule as data and checks it on every import in the tree.

Floor 0, knowing nothing of the gateway and importing nothing of ours:

- ``runtime``: the actor runtime (OTP's gen_server and supervisor on trio): actors, typed messages and
  the one unknown-message policy, supervisors, the registry, ``Published`` snapshot cells, state dumps.
- ``http``: the HTTP/1.1 server and the upstream client (the transport seam, ``MockTransport``).
- ``wire``: the wire formats (OpenAI, Anthropic, Gemini, Bedrock): validation, errors, SSE, translators.
- ``storage``: Postgres for a fleet (``[database] url``): the connections the stores open, migrations.

Floor 1, on the runtime at most, neither importing the other:

- ``config``: the configuration schema, loading from TOML and the environment, its checks, prices, and one
  registry per enumeration (provider types, router policies, failover strategies) that the floors above read.
- ``cluster``: the Redis client, for state shared by every instance of a fleet, and ``serve --workers``
  (the worker processes under a runtime supervisor). Its fleet modules each stand just above the layer
  whose state they share: ``status`` on floor 3, ``breakers`` on 4, ``control`` on 7, ``responses``, ``limits`` and ``governance`` on 8
  (beside the governance package, which app wires them into: neither imports the other).

Floor 2, ``telemetry``: events, metrics, health scores, costs, the usage ledger and its actor.

Floor 3, ``resilience``: circuit breakers (the one breaker predicate), retry, failover groups, the
orderings every policy is made of, and the breaker and failover actors.

Floor 4, ``providers``: one adapter per kind of upstream, the provider table and the provider actors (the
table's only writers, with their supervisor, which drains and withdraws on the control plane's behalf).

Floor 5, ``routing``: router policies, pools and splits, aliases, the in-flight table, and
``Gateway.serve``, the one request pipeline.

Floor 6, ``control``: the control plane (the one writer of the provider catalog and the groups, each
change one typed value through ``ControlPlane.apply``), its persistence and the control socket.

Floor 7, ``front``: the front doors (decode a wire format, call the pipeline, encode the answer) and
the operator routes.

Floor 8, ``governance``: keys, teams and budgets (it uses the front's limiter and the pipeline's errors).

Floor 9, ``app``: builds the supervision tree from the configuration (and wires the fleet's tiers).

Floor 10, ``cli``: ``runestone serve | state | providers | chat | fake-provider``, with the control CLI
client (``control/cli.py``) and the key and team commands (``governance/cli.py``), which are the CLI's.

No import points up. Every package's ``__init__`` says its own layers inside and re-exports its public names (``__all__``);
modules with a leading underscore are private. DESIGN.md and docs/ give the reasons.
"""

__version__ = "0.1.0"
