"""Decoupled actors (IMPALA, APPO): processes that act and send trajectories to one learner.

- :mod:`shoal.actors.shared`: the shared-memory trajectory ring and the versioned weight buffer.
- :mod:`shoal.actors.actor`: what an actor process runs (env, policy copy, slots).
- :mod:`shoal.actors.pool`: the actors as the learner sees them (start, publish, receive,
  release, close); :class:`~shoal.actors.pool.MpActors` runs them on this machine.
- :mod:`shoal.actors.ray_pool`: :class:`~shoal.actors.ray_pool.RayActors`, the same calls with
  Ray actors on any node, trajectories through Ray's object store (``--backend ray``).

The learner loop is :mod:`shoal.training.decoupled`; the algorithms' math is in
:mod:`shoal.algos.impala` and :mod:`shoal.algos.appo`.
"""
