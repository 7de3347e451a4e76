{
  "targets": [
    {
      "target_name": "rexmesh_spawn",
      "sources": ["spawn.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
      "defines": ["_GNU_SOURCE", "NAPI_VERSION=8"],
      "conditions": [["OS!='linux'", {"type": "none", "sources!": ["spawn.c"]}]]
    }
  ]
}
