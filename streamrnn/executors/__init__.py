"""What runs one compiled step over the busy slot rows.

Modules: ``models`` (the Keras layer chain and its stateful serving clone), ``buckets``
(power-of-two padding of chunk lengths), ``fused`` (the fused XLA recurrent layers),
``keras_runner`` (the Keras executor: reference and fallback).
"""

__all__: list[str] = []
