"""Sharing state between gateway instances through Redis (``[cluster] redis_url``).

``redis`` is the client (trio-native, on hiredis's C parser). Everything here degrades to this instance's
own state while Redis is down and resumes sharing by itself when it is back.
"""
