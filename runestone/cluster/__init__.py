"""Running more than one gateway process: ``workers`` (``runestone serve --workers N`` on one machine)."""
