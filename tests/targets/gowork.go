// A Go program for tests/integration/test_go.py: work() called N times (go run gowork.go N).
package main

import (
	"fmt"
	"os"
	"strconv"
)

//go:noinline
func work(x int) int { return x*3 + 1 }

func main() {
	n := 1000
	if len(os.Args) > 1 {
		n, _ = strconv.Atoi(os.Args[1])
	}
	sum := 0
	for i := 0; i < n; i++ {
		sum += work(i)
	}
	fmt.Printf("work called %d times sum=%d\n", n, sum)
}
