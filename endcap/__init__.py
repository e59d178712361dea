"""endcap: recommendation microservice for online stores."""

# The generated stubs (endcap.v1) live in proto/endcap/v1; installs map them in
# through package-dir, a source checkout finds them here.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
