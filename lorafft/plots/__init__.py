"""Figures and the HTML report (matplotlib is optional: ``pip install 'lorafft[plot]'``)."""
