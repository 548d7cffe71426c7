"""More than one gateway process: ``workers`` runs ``runestone serve --workers N`` on one machine (a parent
supervising N gateway processes on one port); the instances share state through Redis
(``[cluster] redis_url``).

``redis`` is the client (trio-native, on hiredis's C parser). Everything here degrades to this instance's
own state while Redis is down and resumes sharing by itself when it is back.
"""

__all__: list[str] = []  # ``redis`` is addressed directly: importing the package loads no client
