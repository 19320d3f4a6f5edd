"""The names a user picks from: strategies and backends.

The config layer validates against these without importing the launcher (which imports
torch.distributed and, on demand, Ray)."""

STRATEGIES = ("sync", "a3c", "param-avg", "param-server")
BACKENDS = ("local", "mp", "ray")
SERVER_STRATEGIES = ("a3c", "param-server")  # a parameter server holds the global model
