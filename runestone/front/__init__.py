"""Front doors: decode a wire format into a ``ModelRequest``, call the one pipeline, encode the answer.

``api`` (``Front``: the route table, authentication, chat), ``completions``, ``messages``, ``responses``,
``ws`` (the WebSocket API) and ``streams`` (the stream encoders) are the doors; ``health``, ``admin``,
``splits``, ``keys`` and ``dashboard`` the operator routes; ``auth``, ``limits``, ``cache`` and
``errors`` what they share. Each route module is addressed directly (``runestone.front.api``): this
package re-exports nothing, so importing one door does not import them all.
"""

__all__: list[str] = []
