"""Analysis: statistics on result tables and the figures drawn from them."""
