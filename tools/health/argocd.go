package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// scriptTimeout bounds a health script's run, as Argo CD does.
const scriptTimeout = time.Second

// argocdStatuses are the health statuses Argo CD accepts from a script.
var argocdStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true,
}

// argocdHealth runs an Argo CD health script on obj: the object is the global `obj`, and the
// chunk returns a table with `status` and `message`.
func argocdHealth(script string, obj *unstructured.Unstructured) (health, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	L.SetContext(ctx)

	// Only the side-effect-free libraries, like Argo CD; no io, os, package or debug.
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.StringLibName, lua.OpenString},
		{lua.MathLibName, lua.OpenMath},
	} {
		L.Push(L.NewFunction(lib.open))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	// The base library can read files; and print must not mix with the result on stdout.
	L.SetGlobal("dofile", lua.LNil)
	L.SetGlobal("loadfile", lua.LNil)
	L.SetGlobal("print", L.NewFunction(printToStderr))

	L.SetGlobal("obj", toLua(L, obj.Object))
	if err := L.DoString(script); err != nil {
		return health{}, fmt.Errorf("health script: %w", err)
	}
	hs, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return health{}, fmt.Errorf("health script returned %s, want a table", L.Get(-1).Type())
	}
	st, ok := hs.RawGetString("status").(lua.LString)
	if !ok || st == "" {
		return health{}, errors.New("health script returned no status")
	}
	if !argocdStatuses[string(st)] {
		return health{}, fmt.Errorf("health script returned an unknown status %q", st)
	}
	h := health{Status: string(st)}
	if msg := hs.RawGetString("message"); msg != lua.LNil {
		h.Message = msg.String()
	}
	return h, nil
}

// toLua converts a decoded JSON value: objects become tables, arrays 1-based tables, null nil.
func toLua(L *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case map[string]any:
		t := L.CreateTable(0, len(v))
		for k, item := range v {
			t.RawSetString(k, toLua(L, item))
		}
		return t
	case []any:
		t := L.CreateTable(len(v), 0)
		for i, item := range v {
			t.RawSetInt(i+1, toLua(L, item))
		}
		return t
	case string:
		return lua.LString(v)
	case bool:
		return lua.LBool(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	default:
		return lua.LNil
	}
}

func printToStderr(L *lua.LState) int {
	for i := 1; i <= L.GetTop(); i++ {
		if i > 1 {
			fmt.Fprint(os.Stderr, "\t")
		}
		fmt.Fprint(os.Stderr, L.ToStringMeta(L.Get(i)).String())
	}
	fmt.Fprintln(os.Stderr)
	return 0
}
