"""`python -m qlora.config`: print the README's config reference table."""

from qlora.config.reference import reference_markdown

print(reference_markdown())
