"""omni-edge: an edge runtime for the Baichuan-Omni-1.5 omni-modal model.

`import omni_edge` stays light: it imports neither torch nor the native extension. Submodules load what
they need when they are used.
"""

__version__ = "0.1.0"
