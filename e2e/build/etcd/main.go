// Command etcd is the etcd server, built from the go.etcd.io/etcd/server/v3 module at the version
// pinned in ../versions.env. etcd's own main module uses replace directives and so cannot be
// `go install`ed from the module proxy; this wrapper calls the same entry point its main does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
