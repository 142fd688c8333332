"""Looking at a ranking: the HTML contact sheet and the terminal preview."""
