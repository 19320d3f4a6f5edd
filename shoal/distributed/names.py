"""The names a user picks from: strategies and backends.

The config layer validates against these without importing the launcher (which imports
torch.distributed and, on demand, Ray)."""

STRATEGIES = ("sync", "a3c", "param-avg", "param-server")
BACKENDS = ("local", "mp", "ray")
SERVER_STRATEGIES = ("a3c", "param-server")  # a parameter server holds the global model


def one_learner(strategy: str, ps_mode: str = "async") -> bool:
    """Whether the workers' updates are averaged into one (sync, param-avg, a synchronous
    server): together they are one learner, which splits a replay learner's batch and replay
    buffer among them (``Strategy.one_learner``)."""
    return strategy in ("sync", "param-avg") or (strategy == "param-server" and ps_mode == "sync")
