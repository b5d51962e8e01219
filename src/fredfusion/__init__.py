"""fredfusion: RGB + Event fusion drone detection on the FRED dataset."""

__version__ = "0.1.0"
