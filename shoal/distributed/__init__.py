"""How training workers cooperate: strategies, the parameter server, its links and wire format."""
