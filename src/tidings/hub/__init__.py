"""The hub core: no HTTP, no web or client code, and no transport implementation.

- `hub.py`: `Hub` (registry, publish, fan-out, replay, `connect`) and `HubConfig`.
- `transport.py`: the port the hub calls (`Transport`); `tidings.transports` implements it.
- `flush.py`: when offered frames are written (batching, slicing), on an injected clock.
- `subscriber.py`: one subscriber's state table and bounded buffer; `Sink` is where its
  bytes go (the web layer's connection).
- `subscriptions.py`: presence events and the subscriptions API's data.
- `update.py`, `topics.py`: the update value and the compiled topic matchers.
- `auth.py`: what a verified token allows; `tokens.py` mints tokens.
"""
